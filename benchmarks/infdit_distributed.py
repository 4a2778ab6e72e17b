"""Inf-DiT on several ranks: the modelled pipeline for the released model, and CPU ranks measured.

Modelled (released configuration, bf16, 20 Heun steps = 39 evaluations, a square 4x stage to
each size): the batch size the plan picks for the per-rank budget, the pipeline fill and the
speed-up bound from the pipeline model (``models/infdit/pipeline.py``), the boundary keys sent
per evaluation in all and by the busiest sender, the link speed that hides those sends behind
compute at an assumed GPU throughput, and the device memory per rank; next to it the
assignment the executor does not use (lines round-robin) for comparison.

Measured: real ranks (gloo, one thread each, the built-in tiny model) through the pack's
launcher, each timed from a barrier before the upscale to a barrier after it (process
start-up and weight loading excluded), with the CPU time each rank used in between (on a
machine whose cores are shared, it shows how the work splits when wall time cannot); bytes
sent counted by the ranks; the image compared bit for bit with one process.

``python -m ultrares.benchmarks infdit-distributed [--quick]``
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import torch
import torch.distributed as dist

from ..models.infdit import (RELEASED, TINY, BudgetTooSmall, ClipVisionConfig, ClipVisionEncoder, GiB, InfDiT,
                             InfDiTWeights, RankGroup, UpscaleOptions, WeightSource, allocator_headroom, model_pipeline,
                             plan_stage, run_ranks, upscale)
from ..models.infdit.budget import fit_budget
from ..models.infdit.memory import block_bytes
from ..models.infdit.schedule import plan_ranks
from ..models.infdit.sampler import evaluations
from ..models.infdit.worker import upscale_job_arguments
from .machine import describe_machine
from .timing import threads

SIZES = (4096, 8192, 16384)
RANKS = (1, 2, 4, 8)
BUDGET_GIB = 24.0
GPU_TFLOPS = 400.0
"""Assumed sustained bf16 throughput of one GPU (H100-class), for the link-speed column only."""
MEASURED_SIDE, MEASURED_N, MEASURED_STEPS = 128, 4, 5
"""Tiny-model run: 128x128 input -> 512x512 output (32 x 32 blocks of 16 px), 4 x 4-block batches, 9 evaluations."""


def flops_per_token(cfg=RELEASED) -> float:
    """One token's network evaluation: the Linears (QKV, output, MLP: 24 D^2 multiply-adds x 2)
    and attention over the four key segments (QK and AV: 4 x 4L x D x 2)."""
    return cfg.layers * (24 * cfg.hidden ** 2 + 4 * 4 * cfg.block_tokens * cfg.hidden)


def released_on_meta() -> InfDiTWeights:
    """The released DiT and CLIP tower in bf16 on the meta device: the planner's view of them
    (sizes, dtype, bytes) without allocating anything."""
    with torch.device("meta"):
        return InfDiTWeights(InfDiT(RELEASED).to(torch.bfloat16), ClipVisionEncoder(ClipVisionConfig()).to(torch.bfloat16))


def _row(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def modelled(sizes=SIZES, ranks_list=RANKS, budget_gib: float = BUDGET_GIB) -> None:
    """The modelled table for the released configuration."""
    weights = released_on_meta()
    evals = evaluations(20)
    kv = block_bytes(RELEASED, torch.bfloat16)
    block_seconds = flops_per_token() * RELEASED.block_tokens / (GPU_TFLOPS * 1e12)
    print(f"\n### Modelled: released model (bf16), {evals} evaluations, a 4x stage to each size, "
          f"{budget_gib:g} GiB per GPU\n")
    print(f"n: the plan's batch size for the budget per rank (offloading switched on where only it fits: 'off.'); "
          f"fill: share of rank-time computing; speed-up: bound if transfers hide behind compute; sent: boundary "
          f"K/V per evaluation ({kv / 2**20:.0f} MiB per block), in all and by the busiest rank; link: GB/s that "
          f"rank needs to send as fast as it computes at an assumed {GPU_TFLOPS:g} TFLOP/s "
          f"({flops_per_token() / 1e9:.2f} GFLOP per token and evaluation); GPU: the plan's device memory per rank. "
          "Round-robin: lines dealt k -> k mod P, same n (modelled only).\n")
    print(_row(["output", "P", "n", "fill", "speed-up", "sent GiB", "busiest rank GiB", "link GB/s", "GPU GiB",
                "round-robin fill", "round-robin sent GiB"]))
    print(_row(["---"] * 11))
    for side in sizes:
        grid = side // RELEASED.block_px
        for ranks in ranks_list:
            options = UpscaleOptions(scale=4, budget_bytes=budget_gib * GiB,
                                     margin=allocator_headroom(torch.device("cuda")))
            try:
                planned = fit_budget(weights, (side // 4, side // 4), options, ranks)
                plan = plan_stage(weights, side, side, planned, ranks)
            except BudgetTooSmall:
                print(_row([f"{side}x{side}", ranks, "below the minimum"] + [""] * 8))
                continue
            stripes = model_pipeline(grid, grid, plan.n, "auto", ranks, evals)
            robin = model_pipeline(grid, grid, plan.n, "auto", ranks, evals, "round-robin")
            busiest = max(range(ranks), key=lambda r: stripes.sent_blocks[r])
            busy_seconds = stripes.busy[busiest] / evals * block_seconds
            link = stripes.sent_blocks[busiest] * kv / busy_seconds / 1e9 if busy_seconds else 0.0
            print(_row([f"{side}x{side}", ranks, f"{plan.n}{' off.' if planned.offload else ''}",
                        f"{stripes.fill:.1%}", f"{stripes.speedup:.2f}", f"{sum(stripes.sent_blocks) * kv / GiB:.1f}",
                        f"{stripes.sent_blocks[busiest] * kv / GiB:.1f}", f"{link:.1f}",
                        f"{plan.total / GiB:.1f}", f"{robin.fill:.1%}", f"{sum(robin.sent_blocks) * kv / GiB:.1f}"]))


def timed_upscale(group: RankGroup, *, weights: dict, images: torch.Tensor, options: dict) -> dict | None:
    """A rank of the measured run: the upscale between two barriers; rank 0 returns the image,
    the seconds, and the CPU seconds and bytes sent of every rank."""
    loaded = WeightSource(**weights).load()
    dist.barrier()
    started, cpu_started = time.perf_counter(), time.process_time()
    out = upscale(loaded, images, UpscaleOptions(**options), group.device, group=group)
    cpu = time.process_time() - cpu_started
    dist.barrier()
    seconds = time.perf_counter() - started
    ranks: list = [None] * group.ranks
    dist.all_gather_object(ranks, (cpu, group.bytes_sent))
    return ({"image": out, "seconds": seconds, "cpu": [c for c, _ in ranks], "sent": [b for _, b in ranks]}
            if group.rank == 0 else None)


def measured(ranks_list=RANKS, side: int = MEASURED_SIDE) -> None:
    """The measured table: the tiny model on CPU ranks."""
    options = UpscaleOptions(scale=4, steps=MEASURED_STEPS, seed=0, batch_blocks=MEASURED_N)
    source = WeightSource(tiny_seed=0)
    image = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    evals = evaluations(MEASURED_STEPS)
    grid = 4 * side // TINY.block_px
    with threads(1):
        single = upscale(source.load(), image, options, torch.device("cpu"))
    cores = os.cpu_count() or 1
    load = f", load average {os.getloadavg()[0]:.1f} when it started" if hasattr(os, "getloadavg") else ""
    print("\n### Measured: tiny model (2 layers, width 64, 16-px blocks, fp32) on CPU ranks (gloo, one thread each)\n")
    print(f"{4 * side}x{4 * side} output = {grid} x {grid} blocks, {MEASURED_N} x {MEASURED_N}-block batches, "
          f"{evals} evaluations; time per sweep = time between barriers / evaluations. This machine has {cores} "
          f"cores{load}{f', so P > {cores} ranks share them' if max(ranks_list) > cores else ''}: wall times are "
          "noisy; CPU time per rank shows the split. Every rank also prepares the whole image (resizing, CLIP, the "
          "whole noise draw), which is large next to this tiny model's sweeps and small next to the released "
          "model's. Nothing here says anything about GPU speed.\n")
    print(_row(["P", "time per sweep s", "speed-up vs P = 1", "modelled speed-up", "CPU s per sweep, busiest rank",
                "CPU s per sweep, all ranks", "sent per sweep KiB (all ranks)", "planned KiB", "equal to one process"]))
    print(_row(["---"] * 9))
    base = None
    for ranks in ranks_list:
        result = run_ranks("ultrares.benchmarks.infdit_distributed:timed_upscale",
                           upscale_job_arguments(source, image, options), ["cpu"] * ranks, threads=1, timeout=600)
        per_sweep = result["seconds"] / evals
        base = base or per_sweep
        planned = sum(s.sent_blocks for s in plan_ranks(grid, grid, MEASURED_N, "auto", False, ranks))
        planned *= block_bytes(TINY, torch.float32)
        model = model_pipeline(grid, grid, MEASURED_N, "auto", ranks, evals)
        print(_row([ranks, f"{per_sweep:.3f}", f"{base / per_sweep:.2f}x", f"{model.speedup:.2f}x",
                    f"{max(result['cpu']) / evals:.3f}", f"{sum(result['cpu']) / evals:.3f}",
                    f"{sum(result['sent']) / evals / 1024:.0f}", f"{planned / 1024:.0f}",
                    "bit-identical" if torch.equal(result["image"], single) else "DIFFERENT"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ultrares.benchmarks infdit-distributed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="measure 1 and 2 ranks only")
    args = parser.parse_args(argv)
    print(f"Inf-DiT on several ranks, {datetime.date.today().isoformat()}, {describe_machine()}")
    print("No machine with several GPUs was available: the GPU figures are modelled; the measured ones come from "
          "CPU processes.")
    modelled()
    measured((1, 2) if args.quick else RANKS)


if __name__ == "__main__":
    main()
