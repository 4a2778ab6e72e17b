"""GSPN propagation vs softmax self-attention at growing token grids, side by side in one run.

Per grid: PyTorch SDPA self-attention over all tokens, and the GSPN op over the same
``(1, H, W, C)`` map in all four directions, local (chunk 4, the text-to-image setting) and
global (one chunk per row/column), with the number of sequential scan steps each needs.
On a GPU the Triton kernel is timed next to the PyTorch reference.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..kernels.gspn_scan import gspn_scan
from .machine import describe_machine

QUICK_SIDES = (32, 64, 96)
FULL_SIDES = (64, 96, 128, 192, 256)
HEADS = 2


def _time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``repeats`` runs after one warm-up."""
    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    if once() > 1.0:  # slow sizes: one timed run is enough
        repeats = 1
    return statistics.median(once() for _ in range(repeats))


def _attention(tokens: torch.Tensor) -> torch.Tensor:
    n, length, dim = tokens.shape
    heads = tokens.view(n, length, HEADS, dim // HEADS).transpose(1, 2)
    return F.scaled_dot_product_attention(heads, heads, heads)


def _gspn(x: torch.Tensor, lam: torch.Tensor, logits: torch.Tensor, chunk: int | None, backend: str) -> torch.Tensor:
    return sum(gspn_scan(x, lam, logits, d, chunk, backend) for d in range(4))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ultrares.benchmarks gspn", description=__doc__)
    parser.add_argument("--quick", action="store_true", help=f"grids {QUICK_SIDES} only (about a minute on a CPU)")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--max-seconds", type=float, default=30.0,
                        help="skip a measurement whose estimate (from the smaller grid) exceeds this")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for both (default 1: stable timings on a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    backends = ["torch", "triton"] if device.type == "cuda" else ["torch"]
    sides = QUICK_SIDES if args.quick else FULL_SIDES
    repeats = 3 if args.quick else 5
    if __name__ == "__main__":
        print(f"# machine: {describe_machine()}")
    print(f"channels {args.channels}, batch 1, {dtype}, {device.type}, {args.threads} CPU thread(s); GSPN = 4 "
          "directions; times in ms; "
          "speed-up = SDPA time / GSPN time\n")
    columns = ["grid", "tokens", "SDPA"] + [f"GSPN {kind} ({b})" for b in backends for kind in ("chunk 4", "global")]
    columns += ["steps chunk 4 / global", "speed-up chunk 4", "speed-up global"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    last: dict[str, tuple[int, float]] = {}
    for side in sides:
        g = torch.Generator().manual_seed(side)
        x, lam = (torch.randn(1, side, side, args.channels, generator=g).to(device, dtype) for _ in range(2))
        logits = torch.randn(1, side, side, 3, args.channels, generator=g).to(device, dtype)
        tokens = side * side
        runs = {"SDPA": (lambda: _attention(x.view(1, tokens, -1)), 2.0)}
        for b in backends:
            runs[f"chunk 4 ({b})"] = (lambda b=b: _gspn(x, lam, logits, 4, b), 1.0)
            runs[f"global ({b})"] = (lambda b=b: _gspn(x, lam, logits, None, b), 1.0 if b == "triton" else 1.5)
        times: dict[str, float | None] = {}
        for name, (fn, exponent) in runs.items():
            if name in last:  # time grows ~ tokens ** exponent
                previous_tokens, previous = last[name]
                if previous * (tokens / previous_tokens) ** exponent > args.max_seconds:
                    times[name] = None
                    continue
            with torch.no_grad():
                times[name] = _time(fn, device, repeats)
            last[name] = (tokens, times[name])
        cells = [f"{side}x{side}", str(tokens)] + [
            "skipped" if times[n] is None else f"{times[n] * 1e3:.1f}" for n in runs]
        cells.append(f"4 / {side}")
        fastest = backends[-1]
        for kind in ("chunk 4", "global"):
            gspn_time, sdpa_time = times[f"{kind} ({fastest})"], times["SDPA"]
            cells.append("-" if gspn_time is None or sdpa_time is None else f"{sdpa_time / gspn_time:.1f}x")
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
