"""Triton forward and backward of the GSPN line scan (one launch each, loop inside the kernel).

Each program owns one (batch, channel block, chunk) strip and walks the chunk's steps
itself; inside a step it covers all rows, ``BLOCK_R`` at a time. The programs form a 1-D
grid (the y and z grid axes stop at 65535). Element offsets are 64-bit from the image index
on; only pixel indices inside one image are 32-bit (maps under 2**31 pixels). Tensors are
channels last, so a tile of (rows x channels) is contiguous along the channel axis in every
direction: no transposed or flipped copies are made, a direction is only an origin and two
pixel strides. The sigmoid and the boundary-aware normalisation of the three neighbour weights
are computed in the kernel from the logits (forward and backward), in fp32 (fp64 for fp64
inputs). Chunks are left-aligned in both passes, so gradients are right when the scan
length is not a multiple of the chunk (the original CUDA backward right-aligns them).

Neighbouring rows of the previous step were written by other lanes, so they are read back
from the output buffer after a barrier; the state therefore lives in an fp32 buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._gspn_reference import GATE_EPS, accumulation_dtype

_TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}
TILE_ELEMENTS = 2048  # rows x channels of one step tile
MAX_BLOCK_C = 32
# A tile keeps about a dozen (forward) to twenty (backward) values per element in registers;
# 8 elements per thread keeps that well under the 255 registers a thread can have (a 4096-element
# tile on 4 warps would be 32 per thread and spill).
ELEMENTS_PER_THREAD = 8
MAX_WARPS = 8


@triton.jit
def _sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _gates(logit_ptr, pix, c, C, r, R, mask, ACC: tl.constexpr):
    """Sigmoids of the three logits at (pixel, channel), zeroed where the neighbour row is missing,
    and their clamped sum. ``pix`` may point outside the map where ``mask`` is false."""
    base = pix[:, None] * (3 * C) + c[None, :]
    has_up = (r > 0)[:, None]
    has_down = (r < R - 1)[:, None]
    s_up = _sigmoid(tl.load(logit_ptr + base, mask=mask, other=0.0).to(ACC))
    s_mid = _sigmoid(tl.load(logit_ptr + base + C, mask=mask, other=0.0).to(ACC))
    s_down = _sigmoid(tl.load(logit_ptr + base + 2 * C, mask=mask, other=0.0).to(ACC))
    s_up = tl.where(has_up, s_up, 0.0)
    s_down = tl.where(has_down, s_down, 0.0)
    total = s_up + s_mid + s_down
    return s_up, s_mid, s_down, total


@triton.jit
def _strip(n_cblocks, n_chunks, chunk, S, HW, origin, C, BLOCK_C: tl.constexpr):
    """This program's channels, its chunk's steps [s_start, s_end) and its image's first pixel.
    Program ids run over channel blocks fastest, then chunks, then images."""
    pid = tl.program_id(0)
    c = (pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    strip = pid // n_cblocks
    s_start = (strip % n_chunks) * chunk
    s_end = tl.minimum(s_start + chunk, S)
    return c, c < C, s_start, s_end, (strip // n_chunks).to(tl.int64) * HW + origin


@triton.jit
def _tile(base, s, stride_s, r0, stride_r, R, c, c_ok, C, BLOCK_R: tl.constexpr):
    """Rows [r0, r0 + BLOCK_R) of step s: row ids, pixel ids, mask and element offsets."""
    r = r0 + tl.arange(0, BLOCK_R)
    pix = base + s * stride_s + r * stride_r
    return r, pix, (r < R)[:, None] & c_ok[None, :], pix[:, None] * C + c[None, :]


@triton.jit
def _forward_kernel(x_ptr, lam_ptr, logit_ptr, h_ptr, HW, C, S, R, origin, stride_s, stride_r, chunk,
                    n_cblocks, n_chunks, EPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                    ACC: tl.constexpr):
    c, c_ok, s_start, s_end, base = _strip(n_cblocks, n_chunks, chunk, S, HW, origin, C, BLOCK_C)
    for s in range(s_start, s_end):
        for r0 in range(0, R, BLOCK_R):
            r, pix, mask, off = _tile(base, s, stride_s, r0, stride_r, R, c, c_ok, C, BLOCK_R)
            x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
            value = tl.load(lam_ptr + off, mask=mask, other=0.0).to(ACC) * x
            if s > s_start:
                s_up, s_mid, s_down, total = _gates(logit_ptr, pix, c, C, r, R, mask, ACC)
                prev = off - stride_s * C
                h_up = tl.load(h_ptr + prev - stride_r * C, mask=mask & (r > 0)[:, None], other=0.0)
                h_mid = tl.load(h_ptr + prev, mask=mask, other=0.0)
                h_down = tl.load(h_ptr + prev + stride_r * C, mask=mask & (r < R - 1)[:, None], other=0.0)
                value += (s_up * h_up + s_mid * h_mid + s_down * h_down) / tl.maximum(total, EPS)
            tl.store(h_ptr + off, value, mask=mask)
        tl.debug_barrier()


@triton.jit
def _backward_kernel(dy_ptr, logit_ptr, h_ptr, dh_ptr, dlogit_ptr, HW, C, S, R, origin, stride_s, stride_r,
                     chunk, n_cblocks, n_chunks, EPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                     ACC: tl.constexpr):
    c, c_ok, s_start, s_end, base = _strip(n_cblocks, n_chunks, chunk, S, HW, origin, C, BLOCK_C)
    for i in range(0, s_end - s_start):
        s = s_end - 1 - i
        for r0 in range(0, R, BLOCK_R):
            r, pix, mask, off = _tile(base, s, stride_s, r0, stride_r, R, c, c_ok, C, BLOCK_R)
            dh = tl.load(dy_ptr + off, mask=mask, other=0.0).to(ACC)
            if s < s_end - 1:
                # Row r fed, at step s + 1: row r + 1 through its "up" weight, row r through its
                # "mid" weight and row r - 1 through its "down" weight.
                nxt = pix + stride_s
                below = mask & (r < R - 1)[:, None]
                above = mask & (r > 0)[:, None]
                g_up, _, _, t_up = _gates(logit_ptr, nxt + stride_r, c, C, r + 1, R, below, ACC)
                _, g_mid, _, t_mid = _gates(logit_ptr, nxt, c, C, r, R, mask, ACC)
                _, _, g_down, t_down = _gates(logit_ptr, nxt - stride_r, c, C, r - 1, R, above, ACC)
                nxt_off = off + stride_s * C
                dh += g_up / tl.maximum(t_up, EPS) * tl.load(dh_ptr + nxt_off + stride_r * C, mask=below, other=0.0)
                dh += g_mid / tl.maximum(t_mid, EPS) * tl.load(dh_ptr + nxt_off, mask=mask, other=0.0)
                dh += g_down / tl.maximum(t_down, EPS) * tl.load(dh_ptr + nxt_off - stride_r * C, mask=above,
                                                                   other=0.0)
            tl.store(dh_ptr + off, dh, mask=mask)
            if s > s_start:
                has_up = (r > 0)[:, None]
                has_down = (r < R - 1)[:, None]
                prev = off - stride_s * C
                d_up = dh * tl.load(h_ptr + prev - stride_r * C, mask=mask & has_up, other=0.0)
                d_mid = dh * tl.load(h_ptr + prev, mask=mask, other=0.0)
                d_down = dh * tl.load(h_ptr + prev + stride_r * C, mask=mask & has_down, other=0.0)
                s_up, s_mid, s_down, total = _gates(logit_ptr, pix, c, C, r, R, mask, ACC)
                norm = tl.maximum(total, EPS)
                # d(s_k / S)/d s_j = (delta_kj - p_k) / S over the neighbours in S; the clamp cuts
                # the shared term.
                shared = tl.where(total > EPS, (d_up * s_up + d_mid * s_mid + d_down * s_down) / norm, 0.0)
                ds_up = tl.where(has_up, (d_up - shared) / norm, 0.0)
                ds_mid = (d_mid - shared) / norm
                ds_down = tl.where(has_down, (d_down - shared) / norm, 0.0)
                # A missing neighbour has s = 0 and ds = 0, so its logit gradient is 0 too.
                gbase = pix[:, None] * (3 * C) + c[None, :]
                tl.store(dlogit_ptr + gbase, ds_up * s_up * (1.0 - s_up), mask=mask)
                tl.store(dlogit_ptr + gbase + C, ds_mid * s_mid * (1.0 - s_mid), mask=mask)
                tl.store(dlogit_ptr + gbase + 2 * C, ds_down * s_down * (1.0 - s_down), mask=mask)
        tl.debug_barrier()


def _geometry(shape: torch.Size, direction: int) -> tuple[int, int, int, int, int]:
    """(steps, rows, origin pixel, pixel stride along the scan, pixel stride across it)."""
    _, height, width, _ = shape
    if direction == 0:
        return width, height, 0, 1, width
    if direction == 1:
        return height, width, 0, width, 1
    if direction == 2:
        return width, height, width - 1, -1, width
    return height, width, (height - 1) * width, -width, 1


def _launch(kernel, tensors: tuple[torch.Tensor, ...], shape: torch.Size, direction: int, chunk: int,
            acc: torch.dtype) -> None:
    n, height, width, channels = shape
    if height * width >= 2**31:
        raise ValueError(f"a {height}x{width} map has too many pixels for the GSPN kernels (at most 2**31 - 1)")
    steps, rows, origin, stride_s, stride_r = _geometry(shape, direction)
    block_c = min(triton.next_power_of_2(channels), MAX_BLOCK_C)
    block_r = min(triton.next_power_of_2(rows), max(1, TILE_ELEMENTS // block_c))
    n_cblocks, n_chunks = triton.cdiv(channels, block_c), triton.cdiv(steps, chunk)
    warps = min(MAX_WARPS, max(1, block_r * block_c // (32 * ELEMENTS_PER_THREAD)))
    kernel[(n * n_cblocks * n_chunks,)](*tensors, height * width, channels, steps, rows, origin, stride_s, stride_r,
                                        chunk, n_cblocks, n_chunks, EPS=GATE_EPS, BLOCK_R=block_r, BLOCK_C=block_c,
                                        ACC=_TL_ACC[acc], num_warps=warps)


def scan_forward(x: torch.Tensor, lam: torch.Tensor, logits: torch.Tensor, direction: int,
                 chunk: int) -> torch.Tensor:
    """The hidden state ``h`` in the accumulation dtype (fp32, or fp64 for fp64 inputs)."""
    acc = accumulation_dtype(x.dtype)
    h = torch.empty(x.shape, device=x.device, dtype=acc)
    _launch(_forward_kernel, (x.contiguous(), lam.contiguous(), logits.contiguous(), h), x.shape, direction,
            chunk, acc)
    return h


def scan_backward(grad_h: torch.Tensor, x: torch.Tensor, lam: torch.Tensor, logits: torch.Tensor,
                  h: torch.Tensor, direction: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for ``(x, lam, logits)`` given ``dL/dh`` and the saved forward state ``h``."""
    acc = h.dtype
    logits = logits.contiguous()
    dh = torch.empty(x.shape, device=x.device, dtype=acc)
    dlogits = torch.zeros(logits.shape, device=x.device, dtype=acc)
    _launch(_backward_kernel, (grad_h.contiguous(), logits, h, dh, dlogits), x.shape, direction, chunk, acc)
    dx = (lam.to(acc) * dh).to(x.dtype)
    dlam = (x.to(acc) * dh).to(lam.dtype)
    return dx, dlam, dlogits.to(logits.dtype)
