"""Count the bytes interpreted Triton kernels load and store (tests only).

Wraps the masked load/store of Triton's CPU interpreter: every element a mask lets through is
counted with its width, attributed to the named tensor whose storage holds its address (other
addresses, e.g. buffers the op allocates itself, count as ``"other"``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch


@contextlib.contextmanager
def count_traffic(tensors: dict[str, torch.Tensor]) -> Iterator[dict[tuple[str, str], int]]:
    """``{(kind, name): bytes}`` with kind ``"load"`` or ``"store"``, filled while the block runs."""
    from triton.runtime import interpreter

    spans = {name: (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for name, t in tensors.items()}
    counts: dict[tuple[str, str], int] = {}
    builder = interpreter.interpreter_builder
    load, store = builder.create_masked_load, builder.create_masked_store

    def tally(kind: str, ptrs, mask) -> None:
        width = ptrs.get_element_ty().primitive_bitwidth // 8
        addresses = ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape).astype(bool)]
        named = 0
        for name, (low, high) in spans.items():
            hits = int(((addresses >= low) & (addresses < high)).sum())
            if hits:
                counts[(kind, name)] = counts.get((kind, name), 0) + hits * width
                named += hits
        if addresses.size > named:
            counts[(kind, "other")] = counts.get((kind, "other"), 0) + (addresses.size - named) * width

    def masked_load(ptrs, mask, *rest):
        tally("load", ptrs, mask)
        return load(ptrs, mask, *rest)

    def masked_store(ptrs, value, mask, *rest):
        tally("store", ptrs, mask)
        return store(ptrs, value, mask, *rest)

    builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
    try:
        yield counts
    finally:
        builder.create_masked_load, builder.create_masked_store = load, store
