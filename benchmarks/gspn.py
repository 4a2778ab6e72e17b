"""GSPN propagation vs softmax self-attention at growing token grids, side by side in one run.

What is timed, per ``side x side`` grid of ``C``-channel tokens (batch 1, no gradients):

- SDPA: PyTorch ``scaled_dot_product_attention`` over all tokens (q = k = v, ``--heads``
  heads), i.e. what a UNet ``attn1`` computes between its q/k/v and output projections;
- GSPN op: :func:`gspn_scan` in all four directions on the same map, with its three-neighbour
  weights' sigmoid and normalisation (the logits are given), local (chunk 4, the
  text-to-image setting) and global (one chunk per row/column);
- GSPN layer: the whole :class:`GSPNAttention` that replaces SDPA in an ``attn1`` (its proxy
  projection, the logits/gates of every direction, four chunk-4 scans, merge and output
  projection), from the same q, k, v.

The q/k/v and output projections of the host layer run in both cases and are not timed.
The sequential steps of a scan are ``min(chunk, side)`` per direction. On a GPU the Triton
kernel is timed next to the PyTorch reference, and grids grow until memory or the time
limit stops a column.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..kernels._gspn_plan import DEFAULT_SM_COUNT, bytes_per_step, plan_scan
from ..kernels.gspn_scan import gspn_scan
from ..models.gspn import GSPNAttention
from .machine import stamp
from .timing import timed_call

CPU_SIDES = (64, 96, 128, 192, 256)
GPU_SIDES = (64, 128, 256, 512, 1024, 2048, 4096)
QUICK_SIDES = {"cpu": (32, 64, 96), "cuda": (64, 256, 1024)}
CHUNK = 4
PROXY_RATIO = 8
# SDXL's attn1 maps (side, channels) at 1024-px, 2K and 4K images: the sizes the plan table shows.
SDXL_MAPS = ((64, 640), (32, 1280), (128, 640), (64, 1280), (256, 640), (128, 1280))


def kernel_tables() -> None:
    """What the Triton kernels move and how calls are cut into programs: exact counts, no timing."""
    print("### GSPN Triton kernels: bytes per step and programs (exact counts, not timings)\n")
    print("Bytes of global memory per pixel and channel of a step that propagates (inner row), as the kernels "
          "are written (kernels/_gspn_plan.py; the tests check the count against every load and store of the "
          "interpreted kernels). Training = the forward also stores the fp32 state for the backward.\n")
    print("| dtype | path | forward (inference) | forward (training) | backward |")
    print("|---|---|---:|---:|---:|")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for resident in (True, False):
            cells = [bytes_per_step(dtype, "forward", resident), bytes_per_step(dtype, "forward", resident, True),
                     bytes_per_step(dtype, "backward", resident)]
            print(f"| {str(dtype).removeprefix('torch.')} | {'resident' if resident else 'streamed'} | "
                  + " | ".join(map(str, cells)) + " |")
    print(f"\nLaunch plan at batch 1 for a GPU with {DEFAULT_SM_COUNT} SMs (H100/H200); one program owns a block of "
          "channels of one chunk, rows are never split:\n")
    print("| map | channels | chunk | path | channels per program | programs | programs / SMs |")
    print("|---|---|---|---|---:|---:|---:|")
    for side, channels in SDXL_MAPS:
        for chunk in (CHUNK, None):
            plan = plan_scan((1, side, side, channels), 0, chunk or side)
            print(f"| {side}x{side} | {channels} | {chunk or f'global ({side})'} | "
                  f"{'resident' if plan.resident else 'streamed'} | {plan.block_c} | {plan.programs} | "
                  f"{plan.programs / DEFAULT_SM_COUNT:.1f} |")
    print()


def _time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``repeats`` runs after one warm-up (which also compiles Triton kernels).

    On a GPU: wall time between synchronisations. On the CPU: this process's CPU time, so that
    other jobs sharing the machine's cores do not inflate it (it runs on ``--threads`` threads).
    """
    clock = time.perf_counter if device.type == "cuda" else time.process_time

    def once() -> float:
        return timed_call(fn, device, clock)

    if once() > 1.0:  # slow sizes: one timed run is enough
        repeats = 1
    return statistics.median(once() for _ in range(repeats))


def _attention(tokens: torch.Tensor, heads: int) -> torch.Tensor:
    n, length, dim = tokens.shape
    split = tokens.view(n, length, heads, dim // heads).transpose(1, 2)
    return F.scaled_dot_product_attention(split, split, split)


def _gspn(x: torch.Tensor, lam: torch.Tensor, logits: torch.Tensor, chunk: int | None, backend: str) -> torch.Tensor:
    return sum(gspn_scan(x, lam, logits, d, chunk, backend) for d in range(4))


def _cell(value: float | str | None) -> str:
    if value is None:
        return "skipped"
    if isinstance(value, str):
        return value
    ms = value * 1e3
    return f"{ms:.1f}" if ms >= 1 else f"{ms:.3f}"


def _ratio(reference: float | str | None, other: float | str | None) -> str:
    if not isinstance(reference, float) or not isinstance(other, float) or other <= 0:
        return "-"
    return f"{reference / other:.1f}x"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ultrares.benchmarks gspn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="three small grids only (about a minute on a CPU)")
    parser.add_argument("--sides", type=int, nargs="+",
                        help=f"grid sides to run (default: {CPU_SIDES} on a CPU, {GPU_SIDES} on a GPU)")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--heads", type=int, default=2, help="attention heads of the SDPA baseline")
    parser.add_argument("--max-seconds", type=float, default=30.0,
                        help="skip a measurement whose estimate (from the smaller grid) exceeds this")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for both (default 1: stable timings on a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    backends = ["torch", "triton"] if device.type == "cuda" else ["torch"]
    fastest = backends[-1]
    sides = args.sides or (QUICK_SIDES[device.type] if args.quick else
                           GPU_SIDES if device.type == "cuda" else CPU_SIDES)
    repeats = 3 if args.quick else 5
    layer = GSPNAttention(args.channels, max(1, args.channels // PROXY_RATIO), CHUNK).to(device, dtype).eval()
    clock_name = "wall time" if device.type == "cuda" else "CPU time of the process"
    print(f"Measured {stamp()}\n")
    kernel_tables()
    print("### GSPN vs SDPA, time per call\n")
    print(f"{args.channels} channels, SDPA with {args.heads} heads, batch 1, {dtype}, {device.type}, "
          f"{args.threads} CPU thread(s); GSPN op = 4 directions, GSPN layer = the whole attn1 replacement "
          f"(proxy {layer.proxy_dim}, chunk {CHUNK}, {fastest}); times in ms ({clock_name}); "
          "speed-up = SDPA time / GSPN time\n")
    runs: dict[str, tuple[Callable[..., object], float]] = {"SDPA": (lambda t, *_: _attention(t, args.heads), 2.0)}
    for b in backends:
        runs[f"GSPN op chunk {CHUNK} ({b})"] = (lambda t, x, lam, g, b=b: _gspn(x, lam, g, CHUNK, b), 1.0)
        runs[f"GSPN op global ({b})"] = (lambda t, x, lam, g, b=b: _gspn(x, lam, g, None, b),
                                         1.0 if b == "triton" else 1.5)
    runs["GSPN layer"] = (lambda t, x, *_: layer(t, t, t, x.shape[1], x.shape[2], backend=fastest), 1.0)
    columns = ["grid", "tokens", *runs, f"steps chunk {CHUNK} / global", f"speed-up op chunk {CHUNK}",
               "speed-up op global", "speed-up layer"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    last: dict[str, tuple[int, float]] = {}
    for side in sides:
        tokens = side * side
        times: dict[str, float | str | None] = dict.fromkeys(runs)
        try:
            g = torch.Generator().manual_seed(side)
            x, lam = (torch.randn(1, side, side, args.channels, generator=g).to(device, dtype) for _ in range(2))
            logits = torch.randn(1, side, side, 3, args.channels, generator=g).to(device, dtype)
        except torch.OutOfMemoryError:
            print(f"| {side}x{side} | {tokens} | " + " | ".join("OOM" for _ in runs) + " |", flush=True)
            break
        for name, (fn, exponent) in runs.items():
            if name in last:  # time grows ~ tokens ** exponent
                previous_tokens, previous = last[name]
                if previous * (tokens / previous_tokens) ** exponent > args.max_seconds:
                    continue
            try:
                with torch.no_grad():
                    times[name] = _time(lambda: fn(x.view(1, tokens, -1), x, lam, logits), device, repeats)
                last[name] = (tokens, times[name])
            except torch.OutOfMemoryError:
                times[name] = "OOM"
                last[name] = (tokens, float("inf"))
                torch.cuda.empty_cache()
        cells = [f"{side}x{side}", str(tokens), *(_cell(t) for t in times.values()), f"{min(CHUNK, side)} / {side}",
                 _ratio(times["SDPA"], times[f"GSPN op chunk {CHUNK} ({fastest})"]),
                 _ratio(times["SDPA"], times[f"GSPN op global ({fastest})"]),
                 _ratio(times["SDPA"], times["GSPN layer"])]
        print("| " + " | ".join(cells) + " |", flush=True)
        del x, lam, logits


if __name__ == "__main__":
    main()
