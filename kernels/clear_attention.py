"""Circular-window attention (CLEAR's pattern) over a ``[text | image grid | reference]`` sequence.

Semantics (``kernels/_clear_reference.py`` spells them out as a dense mask):

- q, k, v are ``[B, heads, L, D]`` with ``L = n_txt + h*w + n_ref``: ``n_txt`` global tokens
  (text), the image tokens of an ``h x w`` grid in row-major order, then ``n_ref`` global
  tokens (e.g. Kontext reference images).
- Global queries attend to every one of the ``L`` tokens (full rows).
- ``query_rows=(start, stop)`` computes only the image queries of those grid rows: ``q`` is then
  ``[B, heads, (stop - start) * w, D]`` (those queries alone) while k and v keep the whole
  layout. Sequence parallelism uses it: a device's keys are its stripe of rows plus the rows
  around it within the radius, and only its stripe's queries are its work.
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

Autograd: the op is a ``torch.library`` custom op (``ultrares::clear_window_attention``) whose
backward recomputes the forward on the torch path and differentiates that, whichever backend ran
the forward (activation-checkpointing style: nothing but the inputs is kept for the backward).
Its fake implementation lets ``torch.compile`` trace through it (``fullgraph=True`` works).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch

from . import compiled_table
from ._clear_tiles import covering_radius
from ._clear_torch import window_attention_torch
from .backend import TORCH, Backend, BackendSpec, OpBackends, custom_op_name, logger, resolve_backend

__all__ = ["CLEAR_BACKENDS", "circular_window_attention", "covering_radius"]


def _triton_shared_memory(dtype: torch.dtype, arch: int) -> tuple[int, ...]:
    return tuple(compiled_table.shared_memory("clear_window_fwd", dtype, arch).values())


CLEAR_BACKENDS = OpBackends("CLEAR attention", (
    BackendSpec("triton", devices=frozenset({"cuda"}), dtypes=frozenset({torch.bfloat16, torch.float16}),
                min_capability=(8, 0), shared_memory=_triton_shared_memory, max_head_dim=128,
                interpreted_dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16})),
    TORCH,
))

# Set around an eager call: the torch path calls it between tile rows so a long CPU call can be
# cancelled (a callable cannot be an argument of a custom op).
_INTERRUPT: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("clear_interrupt", default=None)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int], n_txt: int,
                  radius: int, n_ref: int, down_k: torch.Tensor | None, down_v: torch.Tensor | None,
                  query_rows: tuple[int, int] | None) -> None:
    if q.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3] or (
            query_rows is None and q.shape != k.shape):
        raise ValueError(f"q, k, v must share one [B, heads, L, D] shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    h, w = grid
    if h < 1 or w < 1 or n_txt < 0 or n_ref < 0:
        raise ValueError(f"bad layout: grid {grid}, n_txt {n_txt}, n_ref {n_ref}")
    if k.shape[2] != n_txt + h * w + n_ref:
        raise ValueError(f"sequence length {k.shape[2]} != n_txt {n_txt} + {h}x{w} image tokens + n_ref {n_ref}")
    if query_rows is not None:
        start, stop = query_rows
        if not 0 <= start < stop <= h:
            raise ValueError(f"query_rows {tuple(query_rows)} are not a range of the grid's {h} rows")
        if q.shape[2] != (stop - start) * w:
            raise ValueError(f"q holds {q.shape[2]} queries, not the {(stop - start) * w} image tokens of rows "
                             f"{start}..{stop - 1}")
    if radius < 1:
        raise ValueError(f"radius must be >= 1 (every image token sees itself), got {radius}")
    if (down_k is None) != (down_v is None):
        raise ValueError("down_k and down_v go together")
    if down_k is not None:
        b, heads, _, dim = q.shape
        if down_k.shape != down_v.shape or down_k.ndim != 4 or down_k.shape[:2] != (b, heads) or down_k.shape[3] != dim:
            raise ValueError(f"down-sampled keys/values must be [{b}, {heads}, M, {dim}], got "
                             f"{tuple(down_k.shape)} and {tuple(down_v.shape)}")


@torch.library.custom_op(custom_op_name("clear_window_attention"), mutates_args=())
def _window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, down_k: torch.Tensor | None,
                      down_v: torch.Tensor | None, grid_h: int, grid_w: int, n_txt: int, radius: int, n_ref: int,
                      scale: float, query_rows: list[int] | None, backend: str) -> torch.Tensor:
    layout = dict(grid=(grid_h, grid_w), n_txt=n_txt, radius=radius, n_ref=n_ref, down_k=down_k, down_v=down_v,
                  scale=scale, query_rows=None if query_rows is None else tuple(query_rows))
    tensors = (q, k, v) if down_k is None else (q, k, v, down_k, down_v)
    if resolve_backend(backend, *tensors, op=CLEAR_BACKENDS) == "triton":
        from ._clear_triton import KernelCannotRun, window_attention_triton

        try:
            return window_attention_triton(q, k, v, **layout)
        except KernelCannotRun as refused:
            if backend != "auto":
                raise
            logger.info("%s: %s; running 'torch'", CLEAR_BACKENDS.op, refused)
    with torch.no_grad():
        return window_attention_torch(q, k, v, **layout, check_interrupt=_INTERRUPT.get())


@_window_attention.register_fake
def _(q, k, v, down_k, down_v, grid_h, grid_w, n_txt, radius, n_ref, scale, query_rows, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op(custom_op_name("clear_window_attention_backward"), mutates_args=())
def _window_attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               down_k: torch.Tensor | None, down_v: torch.Tensor | None, grid_h: int, grid_w: int,
                               n_txt: int, radius: int, n_ref: int, scale: float,
                               query_rows: list[int] | None) -> list[torch.Tensor]:
    """Gradients of q, k, v, down_k, down_v (empty for absent down-sampled keys).

    ``torch.func.vjp`` differentiates the torch path here: a custom op runs below autograd, where
    ``torch.enable_grad()`` alone would record nothing."""
    def forward(*inputs: torch.Tensor) -> torch.Tensor:
        down = inputs[3:] if down_k is not None else (None, None)
        return window_attention_torch(*inputs[:3], grid=(grid_h, grid_w), n_txt=n_txt, radius=radius, n_ref=n_ref,
                                      down_k=down[0], down_v=down[1], scale=scale,
                                      query_rows=None if query_rows is None else tuple(query_rows))

    inputs = (q, k, v) if down_k is None else (q, k, v, down_k, down_v)
    _, pullback = torch.func.vjp(forward, *inputs)
    grads = [g.contiguous() for g in pullback(grad)]
    if down_k is None:
        grads += [q.new_empty(0), q.new_empty(0)]
    return grads


@_window_attention_backward.register_fake
def _(grad, q, k, v, down_k, down_v, grid_h, grid_w, n_txt, radius, n_ref, scale, query_rows):
    inputs = (q, k, v) if down_k is None else (q, k, v, down_k, down_v)
    grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in inputs]
    return grads + ([q.new_empty(0), q.new_empty(0)] if down_k is None else [])


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, down_k, down_v, *layout, _backend = inputs
    ctx.save_for_backward(q, k, v, down_k, down_v)
    ctx.layout = layout
    ctx.has_down = down_k is not None


def _backward(ctx, grad):
    q, k, v, down_k, down_v = ctx.saved_tensors
    dq, dk, dv, ddown_k, ddown_v = _window_attention_backward(grad, q, k, v, down_k, down_v, *ctx.layout)
    if not ctx.has_down:
        ddown_k = ddown_v = None
    return dq, dk, dv, ddown_k, ddown_v, None, None, None, None, None, None, None, None


_window_attention.register_autograd(_backward, setup_context=_setup_context)


@contextlib.contextmanager
def _interrupts(check: Callable[[], None] | None) -> Iterator[None]:
    if check is None or torch.compiler.is_compiling():
        yield
        return
    token = _INTERRUPT.set(check)
    try:
        yield
    finally:
        _INTERRUPT.reset(token)


def circular_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: tuple[int, int],
                              n_txt: int, radius: int, n_ref: int = 0, down_k: torch.Tensor | None = None,
                              down_v: torch.Tensor | None = None, scale: float | None = None,
                              backend: Backend = "auto",
                              check_interrupt: Callable[[], None] | None = None,
                              query_rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Attention restricted to CLEAR's pattern (module docstring); returns a contiguous tensor of
    q's shape and dtype, differentiable with respect to q, k, v and the down-sampled keys/values.
    ``scale`` defaults to ``1/sqrt(D)``. ``query_rows`` computes only the image queries of those
    grid rows, which ``q`` then holds alone. ``check_interrupt`` is called between tile rows of
    the PyTorch path so a long CPU call can be cancelled (not inside ``torch.compile``d code)."""
    _check_inputs(q, k, v, grid, n_txt, radius, n_ref, down_k, down_v, query_rows)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if down_k is not None:
        down_k, down_v = down_k.to(k.dtype), down_v.to(v.dtype)
    with _interrupts(check_interrupt):
        rows = None if query_rows is None else [int(query_rows[0]), int(query_rows[1])]
        return _window_attention(q, k, v, down_k, down_v, grid[0], grid[1], n_txt, radius, n_ref, scale, rows,
                                 backend)
