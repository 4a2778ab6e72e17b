"""Broken weight files as users end up with them, for the loaders' tests (core and integration).

Each case turns a good file into a broken one at the same name and says what the message must
state about it (the file's name is checked by the tests themselves).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

SIGN_IN_PAGE = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Please sign in.</body></html>\n"

FLUX_LORA = {
    "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(4, 8),
    "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(24, 4),
}

CASES: dict[str, str] = {
    "empty": r"is empty \(0 bytes\): the download or copy did not finish",
    "truncated": r"is incomplete: .*a download or copy that did not finish",
    "not-safetensors": r"is not a safetensors file: it is a web page \(the download saved an error or sign-in page",
    "wrong-kind": r"is a FLUX LoRA, not ",
}
"""Case -> what its message says (a regular expression)."""

PICKLE_CASES: dict[str, str] = {
    "empty": r"is empty \(0 bytes\)",
    "truncated": r"is incomplete: the end of its archive is missing",
    "not-a-checkpoint": r"is not a PyTorch checkpoint \(torch\.save\): it is a web page",
}
"""The same for ``torch.save`` files (``.pt``, ``.bin``)."""


def break_file(good: Path, case: str) -> Path:
    """Replace ``good`` by its broken version ``case`` (of :data:`CASES` or :data:`PICKLE_CASES`)."""
    data = good.read_bytes()
    if case == "empty":
        good.write_bytes(b"")
    elif case == "truncated":
        good.write_bytes(data[:len(data) * 2 // 3])
    elif case in ("not-safetensors", "not-a-checkpoint"):
        good.write_bytes(SIGN_IN_PAGE)
    elif case == "wrong-kind":
        save_file(FLUX_LORA, str(good))
    else:
        raise ValueError(f"unknown case {case!r}")
    return good
