"""Plain PyTorch GSPN line scan: the oracle for the Triton kernels and the CPU path.

Autograd differentiates it, so it also gives the reference gradients. It is vectorised over
batch, channel, row and chunk and loops only over the steps inside a chunk (``chunk``
Python iterations, like one launch per step of the original CUDA code).

Layout (shared with the Triton kernels): channels last, like the tokens of an attention
layer. ``x`` and ``lam`` are ``(N, H, W, C)``, ``logits`` is ``(N, H, W, 3, C)`` with the
three neighbour logits (row - 1, same row, row + 1) of the *destination* pixel.
"""

from __future__ import annotations

import torch

DIRECTIONS: tuple[str, ...] = ("left->right", "top->bottom", "right->left", "bottom->top")
GATE_EPS = 1e-7


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64 (gradchecks); everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_scan_frame(t: torch.Tensor, direction: int) -> torch.Tensor:
    """View ``(N, H, W, ...)`` as ``(N, rows, steps, ...)`` with the scan running along axis 2."""
    if direction in (1, 3):
        t = t.transpose(1, 2)
    if direction in (2, 3):
        t = t.flip(2)
    return t


def from_scan_frame(t: torch.Tensor, direction: int) -> torch.Tensor:
    """Inverse of :func:`to_scan_frame`: every pixel's result goes back to its own position."""
    if direction in (2, 3):
        t = t.flip(2)
    if direction in (1, 3):
        t = t.transpose(1, 2)
    return t


def normalized_gates(logits: torch.Tensor) -> torch.Tensor:
    """Row-stochastic neighbour weights from logits ``(N, rows, steps, 3, C)``.

    Sigmoid of each logit divided by the sum over the neighbours that exist: row 0 has no
    row above and the last row none below, so their missing weight is 0 and the others are
    renormalised. Every row of the per-column tridiagonal matrix therefore sums to 1, which
    keeps the scan a convex combination of earlier inputs (no growth, no decay).
    """
    rows = logits.shape[1]
    s = torch.sigmoid(logits)
    index = torch.arange(rows, device=logits.device).view(1, rows, 1, 1)
    exists = torch.stack([index > 0, torch.ones_like(index, dtype=torch.bool), index < rows - 1], dim=-2)
    s = s * exists
    return s / s.sum(dim=-2, keepdim=True).clamp(min=GATE_EPS)


def _shift_rows(h: torch.Tensor, offset: int) -> torch.Tensor:
    """``out[:, r] = h[:, r + offset]``, zero where that row does not exist."""
    zeros = torch.zeros_like(h[:, :1])
    if offset < 0:
        return torch.cat([zeros, h[:, :-1]], dim=1)
    return torch.cat([h[:, 1:], zeros], dim=1)


def scan_reference(x: torch.Tensor, lam: torch.Tensor, logits: torch.Tensor, direction: int,
                   chunk: int) -> torch.Tensor:
    """``h[r, s] = lam*x + G(r-1)·h[r-1, s-1] + G(r)·h[r, s-1] + G(r+1)·h[r+1, s-1]``.

    The scan axis is split into left-aligned chunks of ``chunk`` steps (the last may be
    shorter); each starts from a zero state. Returns ``h`` in ``x.dtype``.
    """
    acc = accumulation_dtype(x.dtype)
    drive = to_scan_frame(lam.to(acc) * x.to(acc), direction)
    gates = normalized_gates(to_scan_frame(logits.to(acc), direction))
    n, rows, steps, channels = drive.shape
    chunks = -(-steps // chunk)
    pad = chunks * chunk - steps
    if pad:
        drive = torch.cat([drive, drive.new_zeros(n, rows, pad, channels)], dim=2)
        gates = torch.cat([gates, gates.new_zeros(n, rows, pad, 3, channels)], dim=2)
    drive = drive.view(n, rows, chunks, chunk, channels)
    gates = gates.view(n, rows, chunks, chunk, 3, channels)
    h = drive[:, :, :, 0]
    columns = [h]
    for t in range(1, chunk):
        g = gates[:, :, :, t]
        h = (drive[:, :, :, t] + g[..., 0, :] * _shift_rows(h, -1) + g[..., 1, :] * h
             + g[..., 2, :] * _shift_rows(h, 1))
        columns.append(h)
    out = torch.stack(columns, dim=3).reshape(n, rows, chunks * chunk, channels)[:, :, :steps]
    return from_scan_frame(out, direction).to(x.dtype)
