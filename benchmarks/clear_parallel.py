"""CLEAR on several devices: bytes exchanged per attention layer and per sampling step for FLUX at
2K/4K/8K on 2, 4 and 8 devices (stripe-parallel CLEAR against Ulysses all-to-all and Ring
attention, counted from the formulas below), then the measured CPU time of one stripe-parallel
call split into compute and communication, on gloo ranks at a tiny size.

``python -m ultrares.benchmarks clear-parallel [--quick]``

Counted bytes are what all devices send together for one joint attention layer, bfloat16
activations (2 bytes), FLUX.1: C = 24 heads x 128 = 3072 channels, T = 512 text tokens, an
``h x w`` grid of N image tokens, P devices:

- CLEAR stripes (``models/clear/parallel.py``; the stripe plan gives the exact rows):
  halo = keys and values of the ``r - 1`` rows next to each of the P - 1 stripe boundaries, both
  ways, ``~ 2 (P-1) (r-1) w 2C b``; text = the text queries' float32 maxima and
  sums+accumulators, two ring all-reduces, ``2 (P-1) T 24 (1 + 129) 4``; with ``_down_d`` also
  the N/d^2 cells' keys and values, a ring all-gather, ``(P-1) (N/d^2) 2C b``.
- Ulysses (DeepSpeed-Ulysses / xDiT): q, k, v all-to-all before attention and the output after,
  ``4 N C b (P-1)/P``; the text tokens are on every device, cut by heads locally.
- Ring attention: every device's keys and values pass the P - 1 others, ``(P-1) N 2C b``.

A sampling step is 57 such layers (19 double + 38 single blocks) per batch row; the stripes' own
inputs and outputs (64 numbers per token, once per step, like any split's scatter and gather)
are left out of all three.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..models.clear.attention import ClearAttention, TokenLayout
from ..models.clear.downsample import down_sampled_count
from ..models.clear.pattern import ClearPattern
from ..models.clear.parallel import call_payload
from ..models.clear.stripes import StripePlan
from .machine import stamp

FLUX_HEADS, FLUX_HEAD_DIM, FLUX_TEXT, FLUX_LAYERS = 24, 128, 512, 19 + 38
BF16 = 2
SIZES = {"2K": 128, "4K": 256, "8K": 512}
DEVICES = (2, 4, 8)
WINDOWS = {"clear_local_16": ClearPattern(16), "clear_local_16_down_4": ClearPattern(16, 4)}
REPO_ROOT = Path(__file__).resolve().parents[1]
# The measured call: a FLUX-shaped call cut down to run in seconds on a CPU.
TINY = dict(grid=(64, 64), heads=4, head_dim=64, n_txt=32, pattern=ClearPattern(8, 4))
RANK_BOOTSTRAP = (
    "import importlib.util, sys\n"
    "root = sys.argv[1]\n"
    "spec = importlib.util.spec_from_file_location('ultrares', root + '/__init__.py', submodule_search_locations=[root])\n"
    "module = importlib.util.module_from_spec(spec); sys.modules['ultrares'] = module; spec.loader.exec_module(module)\n"
    "from ultrares.benchmarks.clear_parallel import rank_main\n"
    "rank_main(*sys.argv[2:])\n"
)


def clear_layer_bytes(side: int, devices: int, pattern: ClearPattern) -> dict[str, int]:
    """Bytes all devices send in one layer, by step, from the stripe plan (ring collectives)."""
    plan = StripePlan.split((side, side), devices, pattern.radius, pattern.down_factor)
    down = pattern.down_factor > 1
    payloads = [call_payload(plan, rank, 1, FLUX_HEADS, FLUX_HEAD_DIM, FLUX_TEXT, down, BF16)
                for rank in range(devices)]
    totals = {kind: sum(p[kind] for p in payloads) for kind in payloads[0]}
    sent = {"halo": totals["exchange"],
            "text": 2 * (devices - 1) * (totals["all_reduce_max"] + totals["all_reduce_sum"]) // devices}
    if down:
        sent["cells"] = (devices - 1) * totals["all_gather"]
    return sent


def ulysses_layer_bytes(side: int, devices: int) -> int:
    return 4 * side * side * FLUX_HEADS * FLUX_HEAD_DIM * BF16 * (devices - 1) // devices


def ring_layer_bytes(side: int, devices: int) -> int:
    return (devices - 1) * side * side * 2 * FLUX_HEADS * FLUX_HEAD_DIM * BF16


def traffic_table() -> None:
    print("### Bytes sent per attention layer, all devices together (FLUX, bfloat16; counted)\n")
    print("CLEAR = the pack's stripes (halo rows + text partials, + down-sampled cells for _down_4); "
          "Ulysses = all-to-all of q, k, v and the output; Ring = keys and values around the ring. "
          f"Per step = {FLUX_LAYERS} layers, batch 1.\n")
    names = list(WINDOWS)
    print("| image | devices | " + " | ".join(f"{n} MB/layer" for n in names)
          + " | Ulysses MB/layer | Ring MB/layer | " + " | ".join(f"{n} GB/step" for n in names)
          + " | Ulysses GB/step | Ring GB/step | Ulysses / CLEAR r16 |")
    print("|---|---:|" + "---:|" * (2 * len(names) + 5))
    for size, side in SIZES.items():
        for devices in DEVICES:
            clear = [sum(clear_layer_bytes(side, devices, WINDOWS[n]).values()) for n in names]
            ulysses, ring = ulysses_layer_bytes(side, devices), ring_layer_bytes(side, devices)
            per_layer = [*clear, ulysses, ring]
            print(f"| {size} | {devices} | " + " | ".join(f"{b / 1e6:,.1f}" for b in per_layer) + " | "
                  + " | ".join(f"{b * FLUX_LAYERS / 1e9:,.2f}" for b in per_layer)
                  + f" | {ulysses / clear[0]:.1f}x |")
    side, devices = SIZES["8K"], 8
    parts = clear_layer_bytes(side, devices, WINDOWS["clear_local_16_down_4"])
    print(f"\nAt 8K on 8 devices, one clear_local_16_down_4 layer: halo {parts['halo'] / 1e6:,.1f} MB, text partials "
          f"{parts['text'] / 1e6:,.1f} MB, down-sampled cells {parts['cells'] / 1e6:,.1f} MB "
          f"({down_sampled_count((side, side), 4)} cells gathered by every device).")


def _tiny_call(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, ClearAttention]:
    t = TINY
    length = t["n_txt"] + t["grid"][0] * t["grid"][1]
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, t["heads"], length, t["head_dim"], generator=g) for _ in range(3))
    return q, k, v, ClearAttention(t["pattern"], backend="torch")


def rank_main(rank: str, world_size: str, store: str, out: str, repeats: str) -> None:
    """One gloo rank of the measurement (started by :func:`measure` through ``RANK_BOOTSTRAP``)."""
    import torch.distributed as dist

    from ..models.clear.communicator import MeteredCommunicator, ProcessGroupCommunicator
    from ..models.clear.parallel import StripeLayout

    rank, world_size, repeats = int(rank), int(world_size), int(repeats)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        t = TINY
        q, k, v, attention = _tiny_call()
        plan = StripePlan.split(t["grid"], world_size, t["pattern"].radius, t["pattern"].down_factor)
        tokens, n_txt = plan.tokens(rank), t["n_txt"]

        def local(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x[:, :, :n_txt], x[:, :, n_txt + tokens.start:n_txt + tokens.stop]], dim=2)

        q, k, v = local(q), local(k), local(v)
        comm = MeteredCommunicator(ProcessGroupCommunicator())
        layout = StripeLayout(t["grid"], 0, plan, rank, comm)
        attention(q, k, v, layout)  # warm-up
        comm.seconds.clear()
        comm.bytes.clear()
        dist.barrier()
        started, cpu = time.perf_counter(), time.process_time()
        for _ in range(repeats):
            attention(q, k, v, layout)
        wall, cpu = (time.perf_counter() - started) / repeats, (time.process_time() - cpu) / repeats
        Path(out).write_text(json.dumps({"wall": wall, "cpu": cpu, "comm": sum(comm.seconds.values()) / repeats,
                                         "bytes": sum(comm.bytes.values()) // repeats}))
    finally:
        dist.destroy_process_group()


def measure(devices: int, repeats: int, timeout: float = 600.0) -> list[dict]:
    """Each rank's seconds per call (wall, in communication) and payload bytes, on gloo ranks."""
    with tempfile.TemporaryDirectory() as folder:
        store = os.path.join(folder, "store")
        outs = [os.path.join(folder, f"rank{rank}.json") for rank in range(devices)]
        processes = [subprocess.Popen([sys.executable, "-c", RANK_BOOTSTRAP, str(REPO_ROOT), str(rank), str(devices),
                                       store, outs[rank], str(repeats)]) for rank in range(devices)]
        try:
            deadline = time.monotonic() + timeout
            for process in processes:
                if process.wait(timeout=max(1.0, deadline - time.monotonic())) != 0:
                    raise RuntimeError(f"a measurement rank exited with {process.returncode}")
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        return [json.loads(Path(out).read_text()) for out in outs]


def time_table(repeats: int) -> None:
    t = TINY
    print("\n### Measured: one stripe-parallel call on gloo ranks, CPU, one thread per rank (float32)\n")
    print(f"Call: {t['heads']} heads x {t['head_dim']}, {t['n_txt']} text tokens, {t['grid'][0]}x{t['grid'][1]} "
          f"image tokens, radius {t['pattern'].radius}, down factor {t['pattern'].down_factor}; mean of {repeats} "
          "calls after one warm-up. 'communication' = time inside the exchange, all-reduces and all-gather, waiting "
          "for slower ranks included; compute = the rest. The ranks share this machine's cores (and whatever else "
          "runs on it), so their wall times include waiting for a core; the CPU time per rank does not. None of "
          "this says anything about a speed-up on separate GPUs: no multi-GPU machine was available.\n")
    q, k, v, attention = _tiny_call()
    torch.set_num_threads(1)
    attention(q, k, v, TokenLayout(t["grid"]))
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        attention(q, k, v, TokenLayout(t["grid"]))
    single, single_cpu = (time.perf_counter() - started) / repeats, (time.process_time() - cpu) / repeats
    print("| devices | wall ms/call (slowest rank) | compute ms (mean) | communication ms (mean) | "
          "communication share | CPU ms/call per rank (mean) | payload KB/call (all ranks) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| 1 | {single * 1e3:.1f} | {single * 1e3:.1f} | 0 | 0% | {single_cpu * 1e3:.1f} | 0 |")
    for devices in (2, 3):
        ranks = measure(devices, repeats)
        wall = max(r["wall"] for r in ranks)
        comm = sum(r["comm"] for r in ranks) / devices
        compute = sum(r["wall"] - r["comm"] for r in ranks) / devices
        cpu = sum(r["cpu"] for r in ranks) / devices
        print(f"| {devices} | {wall * 1e3:.1f} | {compute * 1e3:.1f} | {comm * 1e3:.1f} | "
              f"{100 * comm / (comm + compute):.0f}% | {cpu * 1e3:.1f} | {sum(r['bytes'] for r in ranks) / 1e3:,.0f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ultrares.benchmarks clear-parallel", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer timed calls")
    args = parser.parse_args(argv)
    print(f"# CLEAR on several devices: {stamp()}\n")
    traffic_table()
    time_table(repeats=3 if args.quick else 10)


if __name__ == "__main__":
    main()
