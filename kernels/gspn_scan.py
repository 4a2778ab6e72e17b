"""GSPN line-scan propagation: the one public op of the GSPN method.

Each pixel's hidden state is its own gated input plus a row-stochastic mix of three
neighbours (row - 1, same row, row + 1) of the previous column, scanned in one of four
directions over the map:

    h[r, s] = lam[r, s]*x[r, s] + G_up*h[r-1, s-1] + G_mid*h[r, s-1] + G_down*h[r+1, s-1]

with ``(G_up, G_mid, G_down) = sigmoid(logits) / sum`` over the neighbours that exist, so every
row of the per-column tridiagonal matrix sums to 1. The scan axis is split into left-aligned
chunks of ``chunk`` steps that start from a zero state (GSPN's "local" variant; ``None`` = one
chunk, the global variant). Results are returned at each pixel's own position whatever the
direction, so the four directions can be merged pixel by pixel on any H x W map.
"""

from __future__ import annotations

import torch

from . import compiled_table
from ._gspn_reference import DIRECTIONS, accumulation_dtype, scan_reference
from .backend import TORCH, Backend, BackendSpec, OpBackends, custom_op_name, resolve_backend

__all__ = ["DIRECTIONS", "GSPN_BACKENDS", "gspn_scan"]


def _triton_shared_memory(dtype: torch.dtype, arch: int) -> tuple[int, ...]:
    """The most shared memory any GSPN build (forward or backward) takes on ``sm_<arch>``: the
    plan picks the tile by map shape, so every build must fit. Empty where none was checked."""
    sizes = [v for kernel in ("gspn_scan_fwd", "gspn_scan_bwd")
             for v in compiled_table.shared_memory(kernel, dtype, arch).values()]
    return (max(sizes),) if sizes else ()


# No dots (no tensor cores needed), no spills in any forward build: the kernels run from Turing on,
# in every GPU dtype, on architectures whose builds the compiled-kernel table checked. fp64 runs
# through the interpreter only (gradchecks); on a GPU it takes the PyTorch path.
GSPN_BACKENDS = OpBackends("GSPN scan", (
    BackendSpec("triton", devices=frozenset({"cuda"}), dtypes=frozenset({torch.bfloat16, torch.float16, torch.float32}),
                min_capability=(7, 5), shared_memory=_triton_shared_memory,
                interpreted_dtypes=frozenset({torch.bfloat16, torch.float16, torch.float32, torch.float64})),
    TORCH,
))


# The Triton kernels as PyTorch operators: torch.compile sees them as opaque nodes (shapes from the
# fake implementations) and autograd through them uses the Triton backward.
@torch.library.custom_op(custom_op_name("gspn_scan"), mutates_args=())
def _scan_op(x: torch.Tensor, lam: torch.Tensor, logits: torch.Tensor, direction: int, chunk: int,
             save_state: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, state)``; ``state`` is the fp32 state for the backward pass when ``save_state`` and
    ``h`` is of lower precision, else empty (the backward pass then reads ``h``)."""
    from ._gspn_triton import scan_forward

    h, state = scan_forward(x, lam, logits, direction, chunk, save_state)
    return h, (state if state.dtype != h.dtype else state.new_empty(0))


@_scan_op.register_fake
def _scan_op_fake(x, lam, logits, direction, chunk, save_state):
    acc = accumulation_dtype(x.dtype)
    return torch.empty_like(x), x.new_empty(x.shape if save_state and acc != x.dtype else (0,), dtype=acc)


@torch.library.custom_op(custom_op_name("gspn_scan_backward"), mutates_args=())
def _scan_backward_op(grad_h: torch.Tensor, x: torch.Tensor, lam: torch.Tensor, logits: torch.Tensor,
                      state: torch.Tensor, direction: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ._gspn_triton import scan_backward

    return scan_backward(grad_h, x, lam, logits, state, direction, chunk)


@_scan_backward_op.register_fake
def _scan_backward_op_fake(grad_h, x, lam, logits, state, direction, chunk):
    return torch.empty_like(x), torch.empty_like(lam), torch.empty_like(logits)


def _setup_context(ctx, inputs, output) -> None:
    x, lam, logits, direction, chunk, _ = inputs
    h, state = output
    ctx.save_for_backward(x, lam, logits, state if state.numel() else h)
    ctx.direction, ctx.chunk = direction, chunk


def _backward(ctx, grad_h, _grad_state):
    x, lam, logits, state = ctx.saved_tensors
    dx, dlam, dlogits = _scan_backward_op(grad_h, x, lam, logits, state, ctx.direction, ctx.chunk)
    return dx, dlam, dlogits, None, None, None


_scan_op.register_autograd(_backward, setup_context=_setup_context)


def _check(x: torch.Tensor, lam: torch.Tensor, logits: torch.Tensor, direction: int, chunk: int | None) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be (N, H, W, C), got shape {tuple(x.shape)}")
    if lam.shape != x.shape:
        raise ValueError(f"lam must have x's shape {tuple(x.shape)}, got {tuple(lam.shape)}")
    if logits.shape != (*x.shape[:3], 3, x.shape[3]):
        raise ValueError(f"logits must be (N, H, W, 3, C) = {(*x.shape[:3], 3, x.shape[3])}, "
                         f"got {tuple(logits.shape)}")
    if not (x.dtype == lam.dtype == logits.dtype) or not x.is_floating_point():
        raise TypeError(f"x, lam and logits must share one floating dtype, got {x.dtype}, {lam.dtype}, "
                        f"{logits.dtype}")
    if direction not in range(len(DIRECTIONS)):
        raise ValueError(f"direction must be 0..3 ({', '.join(DIRECTIONS)}), got {direction}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be >= 1 (or None for a global scan), got {chunk}")


def gspn_scan(x: torch.Tensor, lam: torch.Tensor, logits: torch.Tensor, direction: int = 0,
              chunk: int | None = None, backend: Backend = "auto") -> torch.Tensor:
    """Propagate ``x`` over the map in one direction; returns ``h`` with ``x``'s shape and dtype.

    ``x``, ``lam``: ``(N, H, W, C)`` channels last; ``logits``: ``(N, H, W, 3, C)``, the raw
    weights of the (row - 1, same row, row + 1) neighbours. ``direction``: 0 left->right,
    1 top->bottom, 2 right->left, 3 bottom->top (rows are H for 0/2 and W for 1/3).
    Differentiable with respect to all three tensors on both backends.
    """
    _check(x, lam, logits, direction, chunk)
    steps = x.shape[2] if direction in (0, 2) else x.shape[1]
    chunk = max(1, steps if chunk is None else min(chunk, steps))
    if resolve_backend(backend, x, lam, logits, op=GSPN_BACKENDS) == "triton":
        from ._gspn_triton import check_map_size

        check_map_size(x.shape[1], x.shape[2])
        # The fp32 state is kept only when a backward pass will read it (training).
        save_state = torch.is_grad_enabled() and any(t.requires_grad for t in (x, lam, logits))
        return _scan_op(x, lam, logits, direction, chunk, save_state)[0]
    return scan_reference(x, lam, logits, direction, chunk)
