"""Choosing between an op's PyTorch reference and its Triton backend.

Every op in ``kernels/`` exposes one public function with a ``backend`` argument:
``"auto"`` (Triton when the tensors live on a CUDA device and Triton imports, else the
PyTorch path), ``"torch"`` or ``"triton"``. Triton also runs on CPU tensors under
``TRITON_INTERPRET=1``; that is how the tests compare both backends without a GPU.
The environment variable ``ULTRARES_BACKEND`` overrides ``"auto"`` (e.g. to rule Triton
out while debugging a kernel on a GPU).
"""

from __future__ import annotations

import functools
import os
from typing import Literal

import torch

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")
ENV_OVERRIDE = "ULTRARES_BACKEND"


@functools.cache
def triton_importable() -> bool:
    """True when the ``triton`` package imports (it is optional: CPU-only hosts may lack it)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def triton_interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_can_run(*tensors: torch.Tensor) -> bool:
    """Whether a Triton kernel can take these tensors: CUDA tensors, or any under the interpreter."""
    if not triton_importable():
        return False
    if triton_interpreting():
        return True
    return all(t.is_cuda for t in tensors)


def resolve_backend(requested: Backend, *tensors: torch.Tensor) -> Literal["torch", "triton"]:
    """Turn a requested backend into the one that will run, or explain why it cannot.

    ``"auto"`` never fails: it falls back to the PyTorch path. An explicit ``"triton"``
    that cannot run raises, so a caller that asked for the kernel never silently gets
    something else.
    """
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; expected one of {BACKENDS}")
    if requested == "auto":
        requested = os.environ.get(ENV_OVERRIDE, "auto")  # type: ignore[assignment]
        if requested not in BACKENDS:
            raise ValueError(f"{ENV_OVERRIDE}={requested!r} is not one of {BACKENDS}")
    if requested == "torch":
        return "torch"
    if requested == "triton":
        if not triton_importable():
            raise RuntimeError("backend='triton' was requested but the triton package does not import")
        if not triton_can_run(*tensors):
            raise RuntimeError(
                "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
                f"got devices {sorted({str(t.device) for t in tensors})}"
            )
        return "triton"
    on_gpu = bool(tensors) and all(t.is_cuda for t in tensors)
    return "triton" if on_gpu and triton_importable() else "torch"
