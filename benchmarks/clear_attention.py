"""CLEAR attention: work per FLUX attention call at 1K-8K for every released window (exact
FLOPs, tiles a block-sparse kernel visits on the pack's 2D tiles vs FlexAttention-style raster
blocks), then CPU time of the pack's tiled PyTorch path vs dense SDPA vs FlexAttention.

``python -m ultrares.benchmarks clear [--quick]``
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..kernels._clear_tiles import raster_work, tiled_work
from ..kernels._clear_triton import DEFAULT_K_TILE, DEFAULT_Q_TILE, SIDE_BLOCK
from ..models.clear.attention import ClearAttention, TokenLayout
from ..models.clear.downsample import down_sampled_count
from ..models.clear.pattern import ClearPattern
from .machine import stamp
from .timing import timed_call

FLUX_HEADS, FLUX_HEAD_DIM, FLUX_TEXT = 24, 128, 512
SIZES = {"1K": 64, "2K": 128, "4K": 256, "8K": 512}  # square images: tokens per side (16 px each)
RELEASED = {  # file -> pattern
    "clear_local_32": ClearPattern(32), "clear_local_16": ClearPattern(16), "clear_local_8": ClearPattern(8),
    "clear_local_16_down_4": ClearPattern(16, 4), "clear_local_8_down_4": ClearPattern(8, 4),
}
RASTER_BLOCK = 128  # FlexAttention's default block size


def attention_flops(pairs: int) -> float:
    """FLOPs of one FLUX attention call with ``pairs`` query/key pairs per head (QK^T and PV)."""
    return 4.0 * FLUX_HEAD_DIM * FLUX_HEADS * pairs


def work_table(sizes: list[str]) -> None:
    print(f"### Work per attention call (FLUX: {FLUX_HEADS} heads x {FLUX_HEAD_DIM}, {FLUX_TEXT} text tokens, "
          "square images)\n")
    print(f"2D tiles: {DEFAULT_Q_TILE.rows}x{DEFAULT_Q_TILE.cols} query tiles x {DEFAULT_K_TILE.rows}x"
          f"{DEFAULT_K_TILE.cols} key tiles (the Triton kernel); raster: {RASTER_BLOCK}x{RASTER_BLOCK} blocks "
          "on the row-major order (FlexAttention, the reference). 'computed' = visited tiles x tile area, "
          "as % of dense scores.\n")
    print("| image | window | exact TFLOP | exact % dense | 2D tiles visited | 2D computed % | "
          "raster blocks visited | raster computed % | raster / 2D work |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for size in sizes:
        side = SIZES[size]
        grid = (side, side)
        dense = (FLUX_TEXT + side * side) ** 2
        print(f"| {size} | dense | {attention_flops(dense) / 1e12:.2f} | 100 | | | | | |")
        for name, pattern in RELEASED.items():
            n_down = down_sampled_count(grid, pattern.down_factor) if pattern.down_factor > 1 else 0
            tiled = tiled_work(grid, pattern.radius, FLUX_TEXT, 0, n_down, DEFAULT_Q_TILE, DEFAULT_K_TILE,
                               SIDE_BLOCK, block=RASTER_BLOCK)
            raster = raster_work(grid, pattern.radius, FLUX_TEXT, 0, n_down, block=RASTER_BLOCK)
            print(f"| {size} | {name} | {attention_flops(tiled.allowed_pairs) / 1e12:.3f} | "
                  f"{100 * tiled.allowed_pairs / dense:.2f} | "
                  f"{tiled.visited_tiles}/{tiled.total_tiles} ({100 * tiled.visited_tiles / tiled.total_tiles:.1f}%) | "
                  f"{100 * tiled.computed_pairs / dense:.2f} | "
                  f"{raster.visited_tiles}/{raster.total_tiles} ({100 * raster.visited_tiles / raster.total_tiles:.1f}%) | "
                  f"{100 * raster.computed_pairs / dense:.2f} | {raster.computed_pairs / tiled.computed_pairs:.2f}x |")
    print()


def best_times(runners: dict[str, Callable[[], object]], repeats: int, device: torch.device,
               warm_up: bool) -> dict[str, float]:
    """Fastest wall time of each runner over ``repeats`` rounds that run them all in turn (a
    shared machine slows runs at random; interleaving and the minimum keep the ratios fair)."""
    if warm_up:
        for fn in runners.values():
            fn()
    best = {name: float("inf") for name in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            best[name] = min(best[name], timed_call(fn, device))
    return best


def flex_runner(grid: tuple[int, int], pattern: ClearPattern, q, k, v, compiled: bool = True) -> Callable[[], object]:
    """The reference's FlexAttention call for this pattern: a block mask on the raster order (built
    once, as the reference caches it per resolution) and the compiled ``flex_attention``
    (``compiled=False``: eager, for plumbing checks). The layout constants are tensors so the
    compiled kernel is reused across windows."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    h, w = grid
    text, width, image_end, r2 = (torch.tensor(x, device=q.device)
                                  for x in (FLUX_TEXT, w, FLUX_TEXT + h * w, pattern.radius ** 2))

    def mask_mod(b, head, q_idx, kv_idx):
        q_y, q_x = (q_idx - text) // width, (q_idx - text) % width
        kv_y, kv_x = (kv_idx - text) // width, (kv_idx - text) % width
        near = (q_y - kv_y) ** 2 + (q_x - kv_x) ** 2 < r2
        return torch.where(q_idx < text, kv_idx < image_end, (kv_idx < text) | (kv_idx >= image_end) | near)

    n_down = down_sampled_count(grid, pattern.down_factor) if pattern.down_factor > 1 else 0
    down = q.new_zeros(*q.shape[:2], n_down, q.shape[3])
    keys, values = torch.cat([k, down], dim=2), torch.cat([v, down], dim=2)
    sizes = (mask_mod, None, None, q.shape[2], keys.shape[2])
    try:  # on a GPU the mask is built compiled, block by block (eager it materialises L x L booleans)
        block_mask = create_block_mask(*sizes, device=q.device, _compile=compiled and q.is_cuda)
    except TypeError:  # a torch without the keyword
        block_mask = create_block_mask(*sizes, device=q.device)
    attend = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    return lambda: attend(q, keys, values, block_mask=block_mask)


def timing_table(device: torch.device, dtype: torch.dtype, backend: str, sizes: list[str], windows: list[str],
                 heads: int, repeats: int, with_flex: bool, dense_sizes: set[str], note: str = "") -> None:
    where = f"CPU, {torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"### Time per attention call on {where} ({heads} of FLUX's {FLUX_HEADS} heads, head dim "
          f"{FLUX_HEAD_DIM}, {str(dtype).removeprefix('torch.')})\n")
    print(f"The pack's path: `backend='{backend}'` (down-sampling included). FlexAttention: the reference's kernel, "
          f"compiled by inductor, block mask built beforehand. {note}\n")
    print("| image | window | dense SDPA s | FlexAttention s | pack s | dense / pack | flex / pack |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for size in sizes:
        side = SIZES[size]
        grid = (side, side)
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, heads, FLUX_TEXT + side * side, FLUX_HEAD_DIM, generator=g).to(device, dtype)
                   for _ in range(3))
        runners = {}
        if size in dense_sizes:
            runners["dense"] = lambda: F.scaled_dot_product_attention(q, k, v)
        for name in windows:
            clear = ClearAttention(RELEASED[name], backend=backend)
            runners[name] = lambda clear=clear: clear(q, k, v, TokenLayout(grid))
            if with_flex:
                try:
                    runners[f"flex {name}"] = flex_runner(grid, RELEASED[name], q, k, v)
                except Exception as error:  # reported in the table, not hidden
                    print(f"| {size} | {name} | FlexAttention failed: {type(error).__name__}: {error} |")
        best = best_times(runners, repeats, device, warm_up=with_flex or repeats > 1 or device.type == "cuda")
        dense = best.get("dense")
        for name in windows:
            pack, flex = best[name], best.get(f"flex {name}")
            cells = [f"{x:.3f}" if x is not None else "—" for x in (dense, flex, pack)]
            ratios = [f"{x / pack:.2f}x" if x is not None else "—" for x in (dense, flex)]
            print(f"| {size} | {name} | " + " | ".join(cells + ratios) + " |")
    print()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ultrares.benchmarks clear", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="work table + 2K CPU timings, no FlexAttention (~1 min)")
    parser.add_argument("--heads", type=int, default=4, help="heads in the CPU timings (FLUX has 24)")
    args = parser.parse_args(argv)
    print(f"Measured {stamp()}\n")
    work_table(list(SIZES))
    cpu = torch.device("cpu")
    if args.quick:
        timing_table(cpu, torch.float32, "torch", ["2K"], ["clear_local_16", "clear_local_8_down_4"], args.heads,
                     repeats=1, with_flex=False, dense_sizes={"2K"},
                     note="FlexAttention is not timed with --quick: compiling it for the CPU takes ~40 s.")
    else:
        timing_table(cpu, torch.float32, "torch", ["1K", "2K"], list(RELEASED), args.heads, repeats=3,
                     with_flex=True, dense_sizes={"1K", "2K"})
        timing_table(cpu, torch.float32, "torch", ["4K"], ["clear_local_16", "clear_local_8_down_4"], args.heads,
                     repeats=1, with_flex=False, dense_sizes=set(),
                     note="Dense attention and FlexAttention are out of a CPU's reach at 4K.")
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        timing_table(gpu, torch.bfloat16, "triton", list(SIZES) if not args.quick else ["1K", "2K"], list(RELEASED),
                     FLUX_HEADS, repeats=3, with_flex=not args.quick, dense_sizes=set(SIZES))
    else:
        print("No GPU on this machine: the Triton kernel is not timed here (the tables above are CPU-only).")
