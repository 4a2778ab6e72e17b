"""Triton block-sparse forward kernel of circular-window attention.

One program per (2D query tile, batch x head). A query tile is a compact ``QTH x QTW``
rectangle of the image grid; its tokens are gathered in place from the raster layout (the
2D order exists only in the kernel's iteration, so q/k/v are never permuted or copied). The
program attends, with an online softmax accumulated in float32, to:

1. the text keys and the reference keys (contiguous runs, all allowed),
2. the down-sampled keys (a separate tensor, all allowed),
3. only the ``KTH x KTW`` image key tiles that intersect some query's window: the tiles whose
   gap to the query tile is below the radius (see :mod:`._clear_tiles`, which counts exactly
   these tiles). In each row of key tiles within reach they form one span of columns, found
   from the largest horizontal gap the row's vertical gap leaves (an integer square root); the
   spans are walked as one flat loop with no branch in it, so the compiler software-pipelines
   it like the loops over the text keys: with ``num_stages`` > 1 the next tiles' keys and values
   arrive by asynchronous copies (``cp.async``) while the current tile's dots run. The element
   mask is the distance test alone: key columns outside the grid are moved far away instead of
   being tested separately.

The query tiles cover every image row, or only a range of rows that the query tensor holds
alone (a device's stripe under sequence parallelism); the key tiles always come from the whole grid.

Scores stay unscaled until the exponential, where the scale and the running max combine into one
fused multiply-add per score. Global query rows (text, reference tokens) attend to everything
and run as dense attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ..errors import NamedError
from . import compiled_table
from ._clear_tiles import Tile, covering_radius, tile_counts
from ._clear_torch import dense_rows, global_rows
from .backend import device_info, triton_interpreting


@dataclass(frozen=True)
class Launch:
    """Tiles and launch settings of one kernel configuration."""

    q_tile: Tile
    k_tile: Tile
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        """The configuration's name in the compiled table, e.g. ``q8x16-k8x8-w8-s3``."""
        q, k = self.q_tile, self.k_tile
        return f"q{q.rows}x{q.cols}-k{k.rows}x{k.cols}-w{self.num_warps}-s{self.num_stages}"


# Configurations in order of preference. The first is the fast one: 128 queries (8 rows x 16
# columns) fill a tensor-core MMA and 64-key (8 x 8) image tiles hug the circle. What each needs
# in shared memory per GPU architecture is in the compiled-kernel table (kernels/compiled_kernels.json,
# the README prints it): a launch starts at the first configuration the GPU can hold, and should a
# GPU still refuse one (Triton raises OutOfResources at its first launch, e.g. with another Triton
# version), the next one is tried.
LAUNCHES = (
    Launch(Tile(8, 16), Tile(8, 8), num_warps=8, num_stages=3),
    Launch(Tile(8, 16), Tile(8, 8), num_warps=8, num_stages=1),
    Launch(Tile(4, 16), Tile(8, 8), num_warps=4, num_stages=1),
)
DEFAULT_Q_TILE = LAUNCHES[0].q_tile
DEFAULT_K_TILE = LAUNCHES[0].k_tile
SIDE_BLOCK = 64  # keys per step over the text, reference and down-sampled keys
LOG2E = 1.4426950408889634
MAX_GRID_SIDE = 2**13 - 1  # tokens (a 131K-pixel image side)
# Key column given to padding keys: farther from every query than any clamped radius (at most
# the diagonal of the largest grid), and small enough that squared distances fit int32.
FAR = tl.constexpr(1 << 15)
KERNEL = "clear_window_fwd"  # the kernel's name in the compiled table
# (device, dtype) -> index of the first configuration in LAUNCHES that fitted there.
_FITTING: dict[tuple[str, torch.dtype], int] = {}


class KernelCannotRun(NamedError, RuntimeError):
    """The kernel cannot take this call: no configuration fits the GPU's shared memory, or the
    grid is beyond the kernel's limit (``auto`` then runs the torch path)."""


def first_fitting_launch(dtype: torch.dtype, arch: int, shared_memory: int) -> int | None:
    """Index in :data:`LAUNCHES` of the first configuration whose compiled build for ``sm_<arch>``
    fits ``shared_memory`` bytes per program, None if none was built or none fits."""
    built = compiled_table.shared_memory(KERNEL, dtype, arch)
    return next((i for i, launch in enumerate(LAUNCHES) if built.get(launch.name, shared_memory + 1) <= shared_memory),
                None)


@triton.jit
def _online_step(acc, m_i, l_i, q, k, v, allowed, qk_scale, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One online-softmax step (base-2 exponentials, float32 state) over a block of keys.

    ``UPCAST`` feeds the dots float32 operands: Triton's CPU interpreter multiplies bfloat16
    as raw integers, so interpreted bfloat16 runs upcast (GPU runs keep bfloat16 MMAs).
    """
    if UPCAST:
        q = q.to(tl.float32)
        k = k.to(tl.float32)
    s = tl.where(allowed, tl.dot(q, k, input_precision=PRECISION), float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])  # one fused multiply-add per score
    l_i = l_i * alpha + tl.sum(p, 1)
    if UPCAST:
        pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision=PRECISION)
    else:
        pv = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit
def _attend_run(acc, m_i, l_i, q, k_base, v_base, sk_l, sk_d, sv_l, sv_d, offs_d, d_ok, start, count, qk_scale,
                BLOCK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Attend to ``count`` contiguous keys from position ``start``, all of them allowed."""
    for off in range(0, count, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        ok = idx < count
        pos = (start + idx).to(tl.int64)
        k = tl.load(k_base + pos[None, :] * sk_l + offs_d[:, None] * sk_d, mask=ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_base + pos[:, None] * sv_l + offs_d[None, :] * sv_d, mask=ok[:, None] & d_ok[None, :], other=0.0)
        acc, m_i, l_i = _online_step(acc, m_i, l_i, q, k, v, ok[None, :], qk_scale, PRECISION, UPCAST)
    return acc, m_i, l_i


@triton.jit
def _row_span(kty, qy0, qy1, qx0, qx1, grid_h, grid_w, r2, KTH: tl.constexpr, KTW: tl.constexpr):
    """First and last key-tile column a query tile visits in key-tile row ``kty``: the tiles whose
    columns come within ``g`` of the query tile's, ``g`` the largest gap with
    ``gap_y**2 + g**2 < r2`` (so a tile is visited exactly when its gap to the query tile is below
    the radius, the rule :mod:`._clear_tiles` counts)."""
    ky0 = kty * KTH
    gap_y = tl.maximum(tl.maximum(ky0 - qy1, qy0 - (tl.minimum(ky0 + KTH, grid_h) - 1)), 0)
    slack = tl.maximum(r2 - 1 - gap_y * gap_y, 0)
    g = tl.sqrt(slack.to(tl.float32)).to(tl.int32)  # integer square root: the (approximate) float root
    # is within one of it for every slack the clamped radius allows
    g = tl.where(g * g > slack, g - 1, g)
    g = tl.where((g + 1) * (g + 1) <= slack, g + 1, g)
    return tl.maximum(qx0 - g, 0) // KTW, tl.minimum(qx1 + g, grid_w - 1) // KTW


@triton.jit
def _load_key_tile(k_base, v_base, sk_l, sk_d, sv_l, sv_d, offs_d, d_ok, kty, ktx, n_txt, grid_h, grid_w,
                   KTH: tl.constexpr, KTW: tl.constexpr):
    """Keys (``[D, KTH*KTW]``) and values of one image key tile, gathered from the raster layout,
    and the tile's key columns with the ones outside the grid moved far away (so the distance
    test alone rules them out)."""
    offs_n = tl.arange(0, KTH * KTW)
    ky = kty * KTH + offs_n // KTW
    kx = ktx * KTW + offs_n % KTW
    k_ok = (ky < grid_h) & (kx < grid_w)
    k_pos = (n_txt + ky * grid_w + kx).to(tl.int64)
    k = tl.load(k_base + k_pos[None, :] * sk_l + offs_d[:, None] * sk_d, mask=k_ok[None, :] & d_ok[:, None], other=0.0)
    v = tl.load(v_base + k_pos[:, None] * sv_l + offs_d[None, :] * sv_d, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
    return k, v, ky, tl.where(k_ok, kx, FAR)


@triton.jit
def _window_fwd(
    Q, K, V, DK, DV, O, VISITS,
    sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d,
    sdk_b, sdk_h, sdk_l, sdk_d, sdv_b, sdv_h, sdv_l, sdv_d, so_b, so_h, so_l, so_d,
    n_heads, head_dim, n_txt, n_ref, n_down, grid_h, grid_w, q_row0, q_row1, q_start, reach, r2, qk_scale, tiles_x,
    QTH: tl.constexpr, QTW: tl.constexpr, KTH: tl.constexpr, KTW: tl.constexpr, BLOCK_D: tl.constexpr,
    SIDE: tl.constexpr, COUNT_VISITS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # 64-bit offsets: a q/k/v view of a fused [B, L, 3, H, D] tensor exceeds 2**31 elements at 8K.
    b = (pid_bh // n_heads).to(tl.int64)
    hh = (pid_bh % n_heads).to(tl.int64)
    ty = pid_t // tiles_x
    tx = pid_t % tiles_x

    # Query rows q_row0..q_row1 of the grid; Q (and O) hold them from position q_start on.
    offs_m = tl.arange(0, QTH * QTW)
    qy = q_row0 + ty * QTH + offs_m // QTW
    qx = tx * QTW + offs_m % QTW
    q_ok = (qy < q_row1) & (qx < grid_w)
    q_pos = (q_start + (qy - q_row0) * grid_w + qx).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim

    q_base = Q + b * sq_b + hh * sq_h
    k_base = K + b * sk_b + hh * sk_h
    v_base = V + b * sv_b + hh * sv_h
    q = tl.load(q_base + q_pos[:, None] * sq_l + offs_d[None, :] * sq_d, mask=q_ok[:, None] & d_ok[None, :], other=0.0)

    # A finite start for the running max keeps rows whose first block is fully masked NaN-free.
    m_i = tl.full([QTH * QTW], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([QTH * QTW], dtype=tl.float32)
    acc = tl.zeros([QTH * QTW, BLOCK_D], dtype=tl.float32)

    n_img = grid_h * grid_w
    acc, m_i, l_i = _attend_run(acc, m_i, l_i, q, k_base, v_base, sk_l, sk_d, sv_l, sv_d, offs_d, d_ok,
                                0, n_txt, qk_scale, SIDE, PRECISION, UPCAST)
    acc, m_i, l_i = _attend_run(acc, m_i, l_i, q, k_base, v_base, sk_l, sk_d, sv_l, sv_d, offs_d, d_ok,
                                n_txt + n_img, n_ref, qk_scale, SIDE, PRECISION, UPCAST)
    acc, m_i, l_i = _attend_run(acc, m_i, l_i, q, DK + b * sdk_b + hh * sdk_h, DV + b * sdv_b + hh * sdv_h,
                                sdk_l, sdk_d, sdv_l, sdv_d, offs_d, d_ok, 0, n_down, qk_scale, SIDE, PRECISION, UPCAST)

    # Image key tiles: the rows of key tiles within reach, in each row the span of tiles whose gap
    # to the query tile is below the radius (_row_span), walked as one flat loop so the compiler
    # software-pipelines it: the next tiles' keys and values load while this one's dots run.
    qy0 = q_row0 + ty * QTH
    qy1 = tl.minimum(qy0 + QTH, q_row1) - 1
    qx0 = tx * QTW
    qx1 = tl.minimum(qx0 + QTW, grid_w) - 1
    kty_first = tl.maximum(qy0 - reach, 0) // KTH
    n_visits = 0
    for kty in range(kty_first, tl.minimum(qy1 + reach, grid_h - 1) // KTH + 1):
        first, last = _row_span(kty, qy0, qy1, qx0, qx1, grid_h, grid_w, r2, KTH, KTW)
        n_visits += last - first + 1
    kty = kty_first
    ktx, ktx_last = _row_span(kty, qy0, qy1, qx0, qx1, grid_h, grid_w, r2, KTH, KTW)
    for _ in range(0, n_visits):
        k, v, ky, kx = _load_key_tile(k_base, v_base, sk_l, sk_d, sv_l, sv_d, offs_d, d_ok, kty, ktx, n_txt,
                                      grid_h, grid_w, KTH, KTW)
        dy = qy[:, None] - ky[None, :]
        dx = qx[:, None] - kx[None, :]
        acc, m_i, l_i = _online_step(acc, m_i, l_i, q, k, v, dy * dy + dx * dx < r2, qk_scale, PRECISION, UPCAST)
        row_done = ktx == ktx_last
        kty = tl.where(row_done, kty + 1, kty)
        first, last = _row_span(kty, qy0, qy1, qx0, qx1, grid_h, grid_w, r2, KTH, KTW)
        ktx = tl.where(row_done, first, ktx + 1)
        ktx_last = last

    out = acc / tl.where(q_ok, l_i, 1.0)[:, None]  # padding rows saw nothing
    o_ptrs = O + b * so_b + hh * so_h + q_pos[:, None] * so_l + offs_d[None, :] * so_d
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])
    if COUNT_VISITS:
        tl.store(VISITS + pid_t, n_visits)


def _check_tile(tile: Tile, name: str) -> None:
    for side in (tile.rows, tile.cols):
        if side < 1 or side & (side - 1):
            raise ValueError(f"{name} sides must be powers of two, got {tile}")
    if tile.size < 16:
        raise ValueError(f"{name} must hold at least 16 tokens (tensor-core minimum), got {tile}")


def _launch(launch: Launch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, down_k: torch.Tensor,
            down_v: torch.Tensor, out: torch.Tensor, visits: torch.Tensor | None, grid: tuple[int, int], n_txt: int,
            n_ref: int, n_down: int, radius: int, scale: float, query_rows: tuple[int, int] | None) -> None:
    """Run the kernel on the image query rows (all of them, or ``query_rows`` of the grid, which
    ``q`` then holds alone) with one configuration."""
    _check_tile(launch.q_tile, "q_tile")
    _check_tile(launch.k_tile, "k_tile")
    b, heads, _, dim = q.shape
    h, w = grid
    if max(h, w) > MAX_GRID_SIDE:
        raise KernelCannotRun(f"the CLEAR Triton kernel handles grids up to {MAX_GRID_SIDE} tokens a side, got "
                              f"{grid}; use backend='torch'")
    # A radius beyond the grid's diagonal lets every pair through, like the smallest such radius:
    # clamping keeps the kernel's integer distances far from overflow and below FAR.
    radius = min(radius, covering_radius(grid))
    row0, row1, q_start = (0, h, n_txt) if query_rows is None else (*query_rows, 0)
    tiles_y, tiles_x = tile_counts((row1 - row0, w), launch.q_tile)
    n_tiles = tiles_y * tiles_x
    count = visits is not None
    if count and (visits.dtype != torch.int32 or visits.numel() != n_tiles):
        raise ValueError(f"visits must be an int32 tensor with {n_tiles} elements")
    _window_fwd[(n_tiles, b * heads)](
        q, k, v, down_k, down_v, out, visits if count else out,
        *q.stride(), *k.stride(), *v.stride(), *down_k.stride(), *down_v.stride(), *out.stride(),
        heads, dim, n_txt, n_ref, n_down, h, w, row0, row1, q_start, radius - 1, radius * radius, scale * LOG2E,
        tiles_x,
        QTH=launch.q_tile.rows, QTW=launch.q_tile.cols, KTH=launch.k_tile.rows, KTW=launch.k_tile.cols,
        BLOCK_D=max(16, triton.next_power_of_2(dim)), SIDE=SIDE_BLOCK, COUNT_VISITS=count,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=q.dtype == torch.bfloat16 and triton_interpreting(),
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )


@torch.no_grad()
def window_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: tuple[int, int],
                            n_txt: int, radius: int, n_ref: int, down_k: torch.Tensor | None,
                            down_v: torch.Tensor | None, scale: float, launch: Launch | None = None,
                            visits: torch.Tensor | None = None,
                            query_rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The kernel path; arguments as in :func:`ultrares.kernels.clear_attention.circular_window_attention`.

    ``query_rows`` (start, stop): ``q`` holds only the image queries of those grid rows, and only
    they are computed. ``launch`` fixes the configuration (default: the first of :data:`LAUNCHES`
    that fits the GPU). ``visits``, given with ``launch``, is an int32 tensor with one slot per query tile that
    receives the number of image key tiles the kernel visited for it (tests compare it with the
    counter). Not differentiable: the public op's backward recomputes on the torch path.
    """
    if visits is not None and launch is None:
        raise ValueError("visits counts per query tile: give the launch configuration with it")
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if query_rows is None:
        for rows in global_rows(q.shape[2], n_txt, grid[0] * grid[1]):
            dense_rows(q, k, v, out, rows, scale)
    if down_k is None:
        down_k, down_v, n_down = k, v, 0
    else:
        down_k, down_v, n_down = down_k.to(k.dtype), down_v.to(v.dtype), down_k.shape[2]
    layout = dict(grid=grid, n_txt=n_txt, n_ref=n_ref, n_down=n_down, radius=radius, scale=scale,
                  query_rows=query_rows)
    if launch is not None:
        _launch(launch, q, k, v, down_k, down_v, out, visits, **layout)
        return out
    key = (str(q.device), q.dtype)
    if key not in _FITTING and q.is_cuda:
        info = device_info(q.device)
        _FITTING[key] = first_fitting_launch(q.dtype, info.arch, info.shared_memory) or 0
    for index in range(_FITTING.get(key, 0), len(LAUNCHES)):
        try:
            _launch(LAUNCHES[index], q, k, v, down_k, down_v, out, None, **layout)
        except OutOfResources:
            continue
        _FITTING[key] = index
        return out
    raise KernelCannotRun(f"no configuration of the CLEAR Triton kernel fits the shared memory of {q.device} for "
                       f"{str(q.dtype).removeprefix('torch.')} inputs; use backend='torch'")


# Archs the kernel is offered on (tensor-core MMAs need Ampere or newer) and its dtypes there.
AOT_ARCHS = (80, 86, 89, 90)
GPU_DTYPES = (torch.bfloat16, torch.float16)
MAX_SPILL_BYTES = 128  # per thread, stores and loads each, in every build the dispatcher may pick
# A FLUX 4K call: 24 heads x 128, 512 text tokens, a 256 x 256 grid, radius 16, 64 x 64 down-sampled
# keys; q/k/v are views of one fused [B, L, 3, heads, D] projection, the output is contiguous.
AOT_CALL = dict(heads=24, dim=128, n_txt=512, n_ref=0, n_down=64 * 64, grid=(256, 256), radius=16)


def aot_builds() -> list:
    """The builds the compiled-kernel table holds: every launch configuration in every dtype the
    dispatcher sends to the kernel, on every architecture it is offered on; and, as the record of
    why float32 stays on the torch path, the float32 builds a float32 dispatch would need (the
    fast launch where it fits, sm_90; the smallest one on sm_80)."""
    from .aot import KernelBuild, pointer

    c = AOT_CALL
    heads, dim = c["heads"], c["dim"]
    length = c["n_txt"] + c["grid"][0] * c["grid"][1] + c["n_ref"]
    fused = (length * 3 * heads * dim, dim, 3 * heads * dim, 1)
    down = (heads * c["n_down"] * dim, c["n_down"] * dim, dim, 1)
    contiguous = (heads * length * dim, length * dim, dim, 1)
    strides = {}
    for name, values in (("sq", fused), ("sk", fused), ("sv", fused), ("sdk", down), ("sdv", down), ("so", contiguous)):
        strides.update({f"{name}_{axis}": s for axis, s in zip("bhld", values)})

    def build(launch: Launch, dtype: torch.dtype, archs: tuple[int, ...], max_spill_bytes: int | None) -> KernelBuild:
        ptr = pointer(dtype)
        args = dict(Q=ptr, K=ptr, V=ptr, DK=ptr, DV=ptr, O=ptr, VISITS=ptr, **strides, n_heads=heads, head_dim=dim,
                    n_txt=c["n_txt"], n_ref=c["n_ref"], n_down=c["n_down"], grid_h=c["grid"][0],
                    grid_w=c["grid"][1], q_row0=0, q_row1=c["grid"][0], q_start=c["n_txt"], reach=c["radius"] - 1,
                    r2=c["radius"] ** 2, qk_scale=dim ** -0.5 * LOG2E,
                    tiles_x=tile_counts(c["grid"], launch.q_tile)[1], QTH=launch.q_tile.rows,
                    QTW=launch.q_tile.cols, KTH=launch.k_tile.rows, KTW=launch.k_tile.cols, BLOCK_D=dim,
                    SIDE=SIDE_BLOCK, COUNT_VISITS=False, PRECISION="ieee" if dtype == torch.float32 else "tf32",
                    UPCAST=False)
        return KernelBuild(KERNEL, launch.name, dtype, archs, _window_fwd, args, launch.num_warps, launch.num_stages,
                           pipelined=(_attend_run, _load_key_tile), dots=True, max_spill_bytes=max_spill_bytes)

    dispatched = [build(launch, dtype, AOT_ARCHS, MAX_SPILL_BYTES) for launch in LAUNCHES for dtype in GPU_DTYPES]
    return dispatched + [build(LAUNCHES[0], torch.float32, (90,), None), build(LAUNCHES[-1], torch.float32, (80,), None)]
