"""Triton forward and backward of the GSPN line scan (one launch each, loop inside the kernel).

Each program owns one (batch, channel block, chunk) strip and walks the chunk's steps
itself. The programs form a 1-D grid (the y and z grid axes stop at 65535). Element offsets
are 64-bit from the image index on; only pixel indices inside one image are 32-bit (maps
under 2**31 pixels). Tensors are channels last, so a tile of (rows x channels) is contiguous
along the channel axis in every direction: no transposed or flipped copies are made, a
direction is only an origin and two pixel strides. The sigmoid and the boundary-aware
normalisation of the three neighbour weights are computed in the kernel from the logits
(forward and backward), in fp32 (fp64 for fp64 inputs). Chunks are left-aligned in both
passes, so gradients are right when the scan length is not a multiple of the chunk (the
original CUDA backward right-aligns them).

How a call is cut into programs, and which of the two paths runs, is :mod:`._gspn_plan`'s:

- *resident*: the state stays in registers in the accumulation dtype for the whole chunk and
  its row neighbours come from ``tl.gather`` (on chip). Global memory sees only the inputs
  (no logits at a chunk's first step) and one store of the result in the input dtype; the
  fp32 state is stored too only when a backward pass will read it. The step loop is software
  pipelined (``tl.range(num_stages=PIPELINE_STAGES)``): nothing it loads depends on the state.
- *streamed* (taller maps): row tiles, the previous step read back from an fp32 state buffer
  after a barrier, because other lanes wrote it.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._gspn_plan import DEFAULT_SM_COUNT, ScanPlan, geometry, plan_scan
from ._gspn_reference import GATE_EPS, accumulation_dtype

_TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}
# Steps whose loads are issued ahead (cp.async into shared memory from sm_80 on) in the resident
# kernels: their inputs do not depend on the state, so the next step's loads overlap this one.
PIPELINE_STAGES = 2
FORWARD, BACKWARD = "gspn_scan_fwd", "gspn_scan_bwd"  # names in the compiled-kernel table
# GPUs the kernels are built and checked for (kernels/compiled_kernels.json): Turing to Blackwell;
# those whose resident loops are software pipelined (see pipeline_stages).
AOT_ARCHS = (75, 80, 86, 89, 90, 100, 120)
PIPELINED_ARCHS = (80, 86, 89, 90, 100)
_PIPELINED = {divmod(arch, 10) for arch in PIPELINED_ARCHS}
GPU_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def pipeline_stages(device: torch.device, resident: bool) -> int:
    """Loop stages of a launch. Asynchronous copies exist from sm_80 on, but compiled for sm_120
    (RTX 50) the pipelined forward spills (ptxas keeps it to 80 registers), so it runs unpipelined
    there, as on Turing; the streamed loops wait on a barrier every step and are not pipelined."""
    if not resident:
        return 1
    if device.type == "cuda" and torch.cuda.get_device_capability(device) not in _PIPELINED:
        return 1
    return PIPELINE_STAGES


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; :data:`DEFAULT_SM_COUNT` elsewhere."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SM_COUNT


@triton.jit
def _sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _gates(logit_ptr, pix, c, C, r, R, mask, ACC: tl.constexpr):
    """Sigmoids of the three logits at (pixel, channel), zeroed where the neighbour row is missing,
    and their sum. ``pix`` may point outside the map where ``mask`` is false."""
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
def _row_indices(BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per element of a (rows x channels) tile: the row above and the row below (clamped)."""
    r = tl.arange(0, BLOCK_R)[:, None] + tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.int32)
    return tl.maximum(r - 1, 0), tl.minimum(r + 1, BLOCK_R - 1)


@triton.jit
def _drive(x_ptr, lam_ptr, off, mask, ACC: tl.constexpr):
    """lambda * x of one tile, in the accumulation dtype."""
    return tl.load(lam_ptr + off, mask=mask, other=0.0).to(ACC) * tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)


@triton.jit
def _after_first_step(mask, s, s_start):
    """``mask`` at the steps that propagate (not a chunk's first), else all false. Written as a
    ``where``: Triton 3.9's interpreter builds ``mask & (s > s_start)`` with an int32 payload that
    its loads reject."""
    return tl.where(s > s_start, mask, False)


# Only the channel count is specialised (its divisibility by 16 lets loads vectorise): the four
# directions and every map size then share one build per tile, the build the compiled-kernel table
# checks.
_SHAPE_ARGS = ["HW", "S", "R", "origin", "stride_s", "stride_r", "chunk", "n_cblocks", "n_chunks"]


@triton.jit(do_not_specialize=_SHAPE_ARGS)
def _forward_kernel(x_ptr, lam_ptr, logit_ptr, out_ptr, state_ptr, HW, C, S, R, origin, stride_s, stride_r, chunk,
                    n_cblocks, n_chunks, EPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                    ACC: tl.constexpr, RESIDENT: tl.constexpr, SEPARATE_STATE: tl.constexpr,
                    STAGES: tl.constexpr):
    c, c_ok, s_start, s_end, base = _strip(n_cblocks, n_chunks, chunk, S, HW, origin, C, BLOCK_C)
    if RESIDENT:
        above, below = _row_indices(BLOCK_R, BLOCK_C)
        h = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
        for s in tl.range(s_start, s_end, num_stages=STAGES):
            r, pix, mask, off = _tile(base, s, stride_s, 0, stride_r, R, c, c_ok, C, BLOCK_R)
            # At a chunk's first step the state is 0: its logits are not needed, nor loaded.
            s_up, s_mid, s_down, total = _gates(logit_ptr, pix, c, C, r, R, _after_first_step(mask, s, s_start), ACC)
            value = _drive(x_ptr, lam_ptr, off, mask, ACC)
            mixed = s_up * tl.gather(h, above, 0) + s_mid * h + s_down * tl.gather(h, below, 0)
            h = tl.where(mask, value + mixed / tl.maximum(total, EPS), 0.0)
            tl.store(out_ptr + off, h.to(out_ptr.dtype.element_ty), mask=mask)
            if SEPARATE_STATE:
                tl.store(state_ptr + off, h, mask=mask)
    else:
        for s in range(s_start, s_end):
            for r0 in range(0, R, BLOCK_R):
                r, pix, mask, off = _tile(base, s, stride_s, r0, stride_r, R, c, c_ok, C, BLOCK_R)
                x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
                value = tl.load(lam_ptr + off, mask=mask, other=0.0).to(ACC) * x
                if s > s_start:
                    s_up, s_mid, s_down, total = _gates(logit_ptr, pix, c, C, r, R, mask, ACC)
                    prev = off - stride_s * C
                    h_up = tl.load(state_ptr + prev - stride_r * C, mask=mask & (r > 0)[:, None], other=0.0)
                    h_mid = tl.load(state_ptr + prev, mask=mask, other=0.0)
                    h_down = tl.load(state_ptr + prev + stride_r * C, mask=mask & (r < R - 1)[:, None], other=0.0)
                    value += (s_up * h_up + s_mid * h_mid + s_down * h_down) / tl.maximum(total, EPS)
                tl.store(state_ptr + off, value, mask=mask)
                if SEPARATE_STATE:
                    tl.store(out_ptr + off, value.to(out_ptr.dtype.element_ty), mask=mask)
            tl.debug_barrier()


@triton.jit
def _logit_grads(dh, h_up, h_mid, h_down, s_up, s_mid, s_down, total, r, R, EPS: tl.constexpr):
    """Gradients of the three logits from dL/dh and the previous step's neighbours.

    d(s_k / S)/d s_j = (delta_kj - p_k) / S over the neighbours in S; the clamp cuts the
    shared term. A missing neighbour has s = 0 and ds = 0, so its logit gradient is 0 too."""
    has_up = (r > 0)[:, None]
    has_down = (r < R - 1)[:, None]
    d_up = dh * h_up
    d_mid = dh * h_mid
    d_down = dh * h_down
    norm = tl.maximum(total, EPS)
    shared = tl.where(total > EPS, (d_up * s_up + d_mid * s_mid + d_down * s_down) / norm, 0.0)
    ds_up = tl.where(has_up, (d_up - shared) / norm, 0.0)
    ds_mid = (d_mid - shared) / norm
    ds_down = tl.where(has_down, (d_down - shared) / norm, 0.0)
    return ds_up * s_up * (1.0 - s_up), ds_mid * s_mid * (1.0 - s_mid), ds_down * s_down * (1.0 - s_down)


@triton.jit
def _store_input_grads(dx_ptr, dlam_ptr, dlogit_ptr, x_ptr, lam_ptr, off, pix, c, C, mask, dh, g_up, g_mid, g_down,
                       ACC: tl.constexpr):
    """dx = lambda * dh, dlambda = x * dh and the logit gradients, in the inputs' dtype."""
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
    lam = tl.load(lam_ptr + off, mask=mask, other=0.0).to(ACC)
    tl.store(dx_ptr + off, (lam * dh).to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dlam_ptr + off, (x * dh).to(dlam_ptr.dtype.element_ty), mask=mask)
    gbase = pix[:, None] * (3 * C) + c[None, :]
    tl.store(dlogit_ptr + gbase, g_up.to(dlogit_ptr.dtype.element_ty), mask=mask)
    tl.store(dlogit_ptr + gbase + C, g_mid.to(dlogit_ptr.dtype.element_ty), mask=mask)
    tl.store(dlogit_ptr + gbase + 2 * C, g_down.to(dlogit_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_SHAPE_ARGS)
def _backward_kernel(dy_ptr, x_ptr, lam_ptr, logit_ptr, state_ptr, dh_ptr, dx_ptr, dlam_ptr, dlogit_ptr, HW, C, S, R,
                     origin, stride_s, stride_r, chunk, n_cblocks, n_chunks, EPS: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr, RESIDENT: tl.constexpr,
                     STAGES: tl.constexpr):
    c, c_ok, s_start, s_end, base = _strip(n_cblocks, n_chunks, chunk, S, HW, origin, C, BLOCK_C)
    if RESIDENT:
        above, below = _row_indices(BLOCK_R, BLOCK_C)
        # dL/dh of the next step and its normalised weights, carried in registers.
        dh_next = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
        p_up = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
        p_mid = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
        p_down = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
        for i in tl.range(0, s_end - s_start, num_stages=STAGES):
            s = s_end - 1 - i
            r, pix, mask, off = _tile(base, s, stride_s, 0, stride_r, R, c, c_ok, C, BLOCK_R)
            # Row r fed, at step s + 1: row r + 1 through its "up" weight, row r through its
            # "mid" weight and row r - 1 through its "down" weight.
            from_below = tl.where((r < R - 1)[:, None], tl.gather(p_up * dh_next, below, 0), 0.0)
            from_above = tl.where((r > 0)[:, None], tl.gather(p_down * dh_next, above, 0), 0.0)
            dh = tl.load(dy_ptr + off, mask=mask, other=0.0).to(ACC) + p_mid * dh_next + from_below + from_above
            dh = tl.where(mask, dh, 0.0)
            carry = _after_first_step(mask, s, s_start)
            s_up, s_mid, s_down, total = _gates(logit_ptr, pix, c, C, r, R, carry, ACC)
            h_prev = tl.load(state_ptr + off - stride_s * C, mask=carry, other=0.0).to(ACC)
            g_up, g_mid, g_down = _logit_grads(dh, tl.gather(h_prev, above, 0), h_prev, tl.gather(h_prev, below, 0),
                                               s_up, s_mid, s_down, total, r, R, EPS)
            _store_input_grads(dx_ptr, dlam_ptr, dlogit_ptr, x_ptr, lam_ptr, off, pix, c, C, mask, dh, g_up, g_mid,
                               g_down, ACC)
            norm = tl.maximum(total, EPS)
            p_up = s_up / norm
            p_mid = s_mid / norm
            p_down = s_down / norm
            dh_next = dh
    else:
        for i in range(0, s_end - s_start):
            s = s_end - 1 - i
            for r0 in range(0, R, BLOCK_R):
                r, pix, mask, off = _tile(base, s, stride_s, r0, stride_r, R, c, c_ok, C, BLOCK_R)
                dh = tl.load(dy_ptr + off, mask=mask, other=0.0).to(ACC)
                if s < s_end - 1:
                    nxt = pix + stride_s
                    below_ok = mask & (r < R - 1)[:, None]
                    above_ok = mask & (r > 0)[:, None]
                    g_up, _, _, t_up = _gates(logit_ptr, nxt + stride_r, c, C, r + 1, R, below_ok, ACC)
                    _, g_mid, _, t_mid = _gates(logit_ptr, nxt, c, C, r, R, mask, ACC)
                    _, _, g_down, t_down = _gates(logit_ptr, nxt - stride_r, c, C, r - 1, R, above_ok, ACC)
                    nxt_off = off + stride_s * C
                    dh += g_up / tl.maximum(t_up, EPS) * tl.load(dh_ptr + nxt_off + stride_r * C, mask=below_ok,
                                                                 other=0.0)
                    dh += g_mid / tl.maximum(t_mid, EPS) * tl.load(dh_ptr + nxt_off, mask=mask, other=0.0)
                    dh += g_down / tl.maximum(t_down, EPS) * tl.load(dh_ptr + nxt_off - stride_r * C, mask=above_ok,
                                                                     other=0.0)
                tl.store(dh_ptr + off, dh, mask=mask)
                carry = _after_first_step(mask, s, s_start)
                prev = off - stride_s * C
                h_up = tl.load(state_ptr + prev - stride_r * C, mask=carry & (r > 0)[:, None], other=0.0).to(ACC)
                h_mid = tl.load(state_ptr + prev, mask=carry, other=0.0).to(ACC)
                h_down = tl.load(state_ptr + prev + stride_r * C, mask=carry & (r < R - 1)[:, None],
                                 other=0.0).to(ACC)
                s_up, s_mid, s_down, total = _gates(logit_ptr, pix, c, C, r, R, carry, ACC)
                g_up, g_mid, g_down = _logit_grads(dh, h_up, h_mid, h_down, s_up, s_mid, s_down, total, r, R, EPS)
                _store_input_grads(dx_ptr, dlam_ptr, dlogit_ptr, x_ptr, lam_ptr, off, pix, c, C, mask, dh, g_up,
                                   g_mid, g_down, ACC)
            tl.debug_barrier()


def check_map_size(height: int, width: int) -> None:
    """Pixel indices inside one image are 32-bit in the kernels."""
    if height * width >= 2**31:
        raise ValueError(f"a {height}x{width} map has too many pixels for the GSPN kernels (at most 2**31 - 1)")


def _launch(kernel, tensors: tuple[torch.Tensor, ...], shape: torch.Size, direction: int, chunk: int,
            acc: torch.dtype, plan: ScanPlan, **constants) -> None:
    stages = pipeline_stages(tensors[0].device, plan.resident)
    n, height, width, channels = shape
    check_map_size(height, width)
    _, _, origin, stride_s, stride_r = geometry(shape, direction)
    n_cblocks = triton.cdiv(channels, plan.block_c)
    kernel[(plan.programs,)](*tensors, height * width, channels, plan.steps, plan.rows, origin, stride_s, stride_r,
                             chunk, n_cblocks, plan.chunks, EPS=GATE_EPS, BLOCK_R=plan.block_r,
                             BLOCK_C=plan.block_c, ACC=_TL_ACC[acc], RESIDENT=plan.resident, STAGES=stages,
                             num_warps=plan.num_warps, num_stages=stages, **constants)


def _plan(x: torch.Tensor, direction: int, chunk: int) -> ScanPlan:
    return plan_scan(tuple(x.shape), direction, chunk, sm_count(x.device))


def scan_forward(x: torch.Tensor, lam: torch.Tensor, logits: torch.Tensor, direction: int, chunk: int,
                 save_state: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, state)``: ``h`` in ``x.dtype``; ``state`` is ``h`` in the accumulation dtype when
    ``save_state`` (what the backward pass reads), else an empty tensor. For fp32/fp64 inputs
    the two are the same values, and ``state`` is ``h`` itself."""
    acc = accumulation_dtype(x.dtype)
    plan = _plan(x, direction, chunk)
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    separate = acc != x.dtype and (save_state or not plan.resident)
    state = torch.empty(x.shape, device=x.device, dtype=acc) if separate else out
    _launch(_forward_kernel, (x.contiguous(), lam.contiguous(), logits.contiguous(), out, state), x.shape, direction,
            chunk, acc, plan, SEPARATE_STATE=separate)
    if not save_state:
        state = x.new_empty(0, dtype=acc)
    return out, state


def scan_backward(grad_h: torch.Tensor, x: torch.Tensor, lam: torch.Tensor, logits: torch.Tensor,
                  state: torch.Tensor, direction: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for ``(x, lam, logits)`` given ``dL/dh`` and the forward ``state``."""
    acc = accumulation_dtype(x.dtype)
    plan = _plan(x, direction, chunk)
    dh = x.new_empty(0, dtype=acc) if plan.resident else torch.empty(x.shape, device=x.device, dtype=acc)
    dx, dlam, dlogits = torch.empty_like(x), torch.empty_like(lam), torch.empty_like(logits)
    _launch(_backward_kernel, (grad_h.contiguous(), x.contiguous(), lam.contiguous(), logits.contiguous(), state, dh,
                               dx, dlam, dlogits), x.shape, direction, chunk, acc, plan)
    return dx, dlam, dlogits


# Tiles the plan picks on SDXL's attn1 maps (batch 1): chunk 4 on 64x64 and 128x128, the global
# scan of 64x64 (channels split to 4) and of 512x512; columns over 512 rows stream.
AOT_TILES = (("resident", 64, 32, 8), ("resident", 64, 4, 1), ("resident", 512, 4, 8), ("streamed", 64, 32, 8),
             ("streamed", 512, 4, 8))
MAX_FORWARD_SPILL_BYTES = 0
# The streamed backward (columns over 512 rows) spills a little in 16-bit on sm_80-sm_90 (4-24 bytes
# per thread in the table); every resident build and every forward build spills nothing.
MAX_BACKWARD_SPILL_BYTES = 32


def aot_builds() -> list:
    """The builds the compiled-kernel table holds: each tile of :data:`AOT_TILES`, forward (for
    16-bit inputs with and without the fp32 state a backward pass needs) and backward, in every GPU
    dtype, for every architecture of :data:`AOT_ARCHS` (pipelined on :data:`PIPELINED_ARCHS`)."""
    from .aot import KernelBuild, pointer

    side, channels = 64, 640
    shape_args = dict(HW=side * side, C=channels, S=side, R=side, origin=0, stride_s=1, stride_r=side, chunk=4,
                      n_cblocks=channels // 32, n_chunks=side // 4)
    builds = []
    for dtype in GPU_DTYPES:
        io, acc = pointer(dtype), pointer(accumulation_dtype(dtype))
        for path, block_r, block_c, warps in AOT_TILES:
            resident = path == "resident"
            unpipelined = tuple(a for a in AOT_ARCHS if a not in PIPELINED_ARCHS)
            for archs, stages in ((unpipelined, 1), (PIPELINED_ARCHS, PIPELINE_STAGES if resident else 1)):
                common = dict(shape_args, EPS=GATE_EPS, BLOCK_R=block_r, BLOCK_C=block_c, ACC=_TL_ACC[accumulation_dtype(dtype)],
                              RESIDENT=resident, STAGES=stages)
                tile = f"{path} {block_r}x{block_c} w{warps}"
                separate = (True,) if not resident and dtype != torch.float32 else (
                    (False, True) if dtype != torch.float32 else (False,))
                for state in separate:
                    config = tile + (" +state" if state and resident else "")
                    builds.append(KernelBuild(
                        FORWARD, config, dtype, archs, _forward_kernel,
                        dict(common, x_ptr=io, lam_ptr=io, logit_ptr=io, out_ptr=io, state_ptr=acc, SEPARATE_STATE=state),
                        warps, stages, pipelined=(_gates, _drive) if stages > 1 else (),
                        max_spill_bytes=MAX_FORWARD_SPILL_BYTES))
                builds.append(KernelBuild(
                    BACKWARD, tile, dtype, archs, _backward_kernel,
                    dict(common, dy_ptr=io, x_ptr=io, lam_ptr=io, logit_ptr=io, state_ptr=acc, dh_ptr=acc, dx_ptr=io,
                         dlam_ptr=io, dlogit_ptr=io),
                    warps, stages, pipelined=(_gates,) if stages > 1 else (), max_spill_bytes=MAX_BACKWARD_SPILL_BYTES))
    return builds
