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
from torch.autograd.function import once_differentiable

from ._gspn_reference import DIRECTIONS, scan_reference
from .backend import Backend, resolve_backend

__all__ = ["DIRECTIONS", "gspn_scan"]


class _TritonScan(torch.autograd.Function):
    """Triton forward and backward; the fp32 state is saved for the backward pass."""

    @staticmethod
    def forward(ctx, x, lam, logits, direction: int, chunk: int):
        from ._gspn_triton import scan_forward

        h = scan_forward(x, lam, logits, direction, chunk)
        ctx.save_for_backward(x, lam, logits, h)
        ctx.direction, ctx.chunk = direction, chunk
        return h.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h):
        from ._gspn_triton import scan_backward

        x, lam, logits, h = ctx.saved_tensors
        dx, dlam, dlogits = scan_backward(grad_h, x, lam, logits, h, ctx.direction, ctx.chunk)
        return dx, dlam, dlogits, None, None


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
    if resolve_backend(backend, x, lam, logits) == "triton":
        return _TritonScan.apply(x, lam, logits, direction, chunk)
    return scan_reference(x, lam, logits, direction, chunk)
