"""Circular-window attention (CLEAR's pattern) over a ``[text | image grid | reference]`` sequence.

Semantics (``kernels/_clear_reference.py`` spells them out as a dense mask):

- q, k, v are ``[B, heads, L, D]`` with ``L = n_txt + h*w + n_ref``: ``n_txt`` global tokens
  (text), the image tokens of an ``h x w`` grid in row-major order, then ``n_ref`` global
  tokens (e.g. Kontext reference images).
- Global queries attend to every one of the ``L`` tokens (full rows).
- Image queries attend to every global token, every down-sampled key (``down_k``/``down_v``,
  ``[B, heads, M, D]``, only image queries see them) and the image tokens strictly inside the
  circle ``dy**2 + dx**2 < radius**2`` around them. Near the border the circle is clipped, not
  shifted inward.

Backends (:data:`CLEAR_BACKENDS`, in priority order): ``"triton"``, a block-sparse kernel that
visits only the key tiles intersecting the window, for bfloat16/float16 CUDA tensors on GPUs with
tensor cores (compute capability 8.0 or newer) and an architecture the compiled-kernel table
holds a fitting build for; ``"torch"``, an exact, memory-bounded tiled path for any device and
dtype (no ``L x L`` tensor). float32 stays on the torch path: its Triton builds run on FMAs,
not tensor cores, and spill about 100 KB per thread. Both equal the dense masked reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import compiled_table
from ._clear_torch import window_attention_torch
from .backend import TORCH, Backend, BackendSpec, OpBackends, logger, resolve_backend

__all__ = ["CLEAR_BACKENDS", "circular_window_attention"]


def _triton_shared_memory(dtype: torch.dtype, arch: int) -> tuple[int, ...]:
    return tuple(compiled_table.shared_memory("clear_window_fwd", dtype, arch).values())


CLEAR_BACKENDS = OpBackends("CLEAR attention", (
    BackendSpec("triton", devices=frozenset({"cuda"}), dtypes=frozenset({torch.bfloat16, torch.float16}),
                min_capability=(8, 0), shared_memory=_triton_shared_memory, max_head_dim=128,
                interpreted_dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16})),
    TORCH,
))


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int], n_txt: int,
                  radius: int, n_ref: int, down_k: torch.Tensor | None, down_v: torch.Tensor | None) -> None:
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one [B, heads, L, D] shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    h, w = grid
    if h < 1 or w < 1 or n_txt < 0 or n_ref < 0:
        raise ValueError(f"bad layout: grid {grid}, n_txt {n_txt}, n_ref {n_ref}")
    if q.shape[2] != n_txt + h * w + n_ref:
        raise ValueError(f"sequence length {q.shape[2]} != n_txt {n_txt} + {h}x{w} image tokens + n_ref {n_ref}")
    if radius < 1:
        raise ValueError(f"radius must be >= 1 (every image token sees itself), got {radius}")
    if (down_k is None) != (down_v is None):
        raise ValueError("down_k and down_v go together")
    if down_k is not None:
        b, heads, _, dim = q.shape
        if down_k.shape != down_v.shape or down_k.ndim != 4 or down_k.shape[:2] != (b, heads) or down_k.shape[3] != dim:
            raise ValueError(f"down-sampled keys/values must be [{b}, {heads}, M, {dim}], got "
                             f"{tuple(down_k.shape)} and {tuple(down_v.shape)}")


def circular_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: tuple[int, int],
                              n_txt: int, radius: int, n_ref: int = 0, down_k: torch.Tensor | None = None,
                              down_v: torch.Tensor | None = None, scale: float | None = None,
                              backend: Backend = "auto",
                              check_interrupt: Callable[[], None] | None = None) -> torch.Tensor:
    """Attention restricted to CLEAR's pattern (module docstring); returns ``[B, heads, L, D]``
    in q's dtype. ``scale`` defaults to ``1/sqrt(D)``. ``check_interrupt`` is called between
    tile rows of the PyTorch path so a long CPU call can be cancelled."""
    _check_inputs(q, k, v, grid, n_txt, radius, n_ref, down_k, down_v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    layout = dict(grid=grid, n_txt=n_txt, radius=radius, n_ref=n_ref, down_k=down_k, down_v=down_v, scale=scale)
    tensors = (q, k, v) if down_k is None else (q, k, v, down_k, down_v)
    if resolve_backend(backend, *tensors, op=CLEAR_BACKENDS) == "triton":
        from ._clear_triton import NoFittingLaunch, window_attention_triton

        try:
            return window_attention_triton(q, k, v, **layout)
        except NoFittingLaunch as refused:
            if backend != "auto":
                raise
            logger.info("%s: %s; running 'torch'", CLEAR_BACKENDS.op, refused)
    return window_attention_torch(q, k, v, **layout, check_interrupt=check_interrupt)
