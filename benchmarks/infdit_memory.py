"""Inf-DiT memory: whole image vs block-scheduled, the batch size a budget buys, growth with size.

Every row is one whole 4x upscale (one Heun step: one network evaluation) measured in this run
next to the memory model's estimate (``models/infdit/memory.py``). How memory is measured is
printed with the tables (:data:`METHOD`).

``python -m ultrares.benchmarks infdit [--quick]``; on the CPU it uses the built-in tiny model
(2 layers, width 64, 16-px blocks), on a GPU the released configuration with random weights.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from ..models.infdit import (RELEASED, GiB, BudgetTooSmall, ClipVisionConfig, ClipVisionEncoder, InfDiT, InfDiTWeights,
                             UpscaleOptions, allocator_headroom, choose_batch_size, estimate_memory,
                             offloaded_host_bytes, plan_stage, tiny_weights, upscale, weight_bytes)
from .machine import stamp
from .meter import LiveTensorMeter
from .timing import threads

MB = 2 ** 20
DERIVED_CASES = [(2048, 8), (4096, 8), (4096, 12), (4096, 16), (4096, 24), (8192, 16), (8192, 24), (16384, 24),
                 (16384, 40)]
METHOD = """\
Measured peak = the largest device memory in use during the upscale, weights included.
- CUDA: torch.cuda.max_memory_allocated around the upscale.
- CPU: a live-tensor meter (TorchDispatchMode) sees every ATen op's output and sums the bytes
  of live tensor storages (tracemalloc does not see them); the weights are added. Host and
  device are the same memory here, so what the code keeps on the host (with offloading: the
  neighbour-key strip, the sampler's full-image buffers, the LR image; always: preparing the
  input and drawing noise) is allocated in the meter's host scopes and not counted, while its
  slices copied for a batch are: the numbers are what a GPU would hold. Scratch a kernel
  frees before returning is not seen.
Model = the memory model's estimate for the same run (what the budget rule uses)."""


def measure(weights: InfDiTWeights, lr_side: int, options: UpscaleOptions, device: torch.device) -> int:
    """Peak device bytes of a 4x upscale of an ``lr_side``-px square image, weights included."""
    image = torch.rand(1, 3, lr_side, lr_side, generator=torch.Generator().manual_seed(0))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        upscale(weights, image, options, device)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    meter = LiveTensorMeter()
    with meter:
        upscale(weights, image, options, device, observer=meter)
    return meter.peak + weight_bytes(weights)


def model_bytes(weights: InfDiTWeights, lr_side: int, options: UpscaleOptions) -> int:
    return plan_stage(weights, 4 * lr_side, 4 * lr_side, options).total


def fits(weights: InfDiTWeights, need: float, device: torch.device) -> bool:
    """On a GPU, whether ``need`` bytes fit at all: a run that does not would fall back to a
    smaller n (on out-of-memory) and measure something else. The CPU meter has no limit."""
    return device.type != "cuda" or need <= torch.cuda.mem_get_info(device)[0] + weight_bytes(weights)


def _row(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _mb(value: float) -> str:
    return f"{value / MB:.2f}"


def full_vs_scheduled(weights, sides, n, device) -> None:
    print(f"\n### Whole image vs block-scheduled (n = {n}) by image side, 4x, MiB measured (model)\n")
    print(_row(["output", "whole image", f"n = {n}", f"n = {n}, offloaded", "whole / n", "whole / offloaded"]))
    print(_row(["---"] * 6))
    block_px = weights.net.cfg.block_px
    columns = []
    for side in sides:
        cells, peaks = [f"{4 * side}x{4 * side}"], []
        for options in (UpscaleOptions(scale=4, steps=1, batch_blocks=4 * side // block_px),
                        UpscaleOptions(scale=4, steps=1, batch_blocks=n),
                        UpscaleOptions(scale=4, steps=1, batch_blocks=n, offload=True)):
            need = model_bytes(weights, side, options)
            peak = measure(weights, side, options, device) if fits(weights, need, device) else float("nan")
            peaks.append(peak)
            cells.append(f"{_mb(peak)} ({_mb(need)})")
        cells += [f"{peaks[0] / peaks[1]:.1f}x", f"{peaks[0] / peaks[2]:.1f}x"]
        columns.append(peaks)
        print(_row(cells))
    grow = [columns[-1][k] / columns[0][k] for k in range(3)]
    print(f"\nSide x{sides[-1] // sides[0]}: peak x{grow[0]:.1f} whole image, x{grow[1]:.2f} with n = {n}, "
          f"x{grow[2]:.2f} offloaded (flat: the device holds weights, one batch and its neighbours only).")


def budgets(weights, side, device, offload: bool) -> None:
    cfg, out = weights.net.cfg, 4 * side
    kwargs = dict(weight_bytes=weight_bytes(weights), dtype=weights.net.dtype, offload=offload)
    floor = estimate_memory(cfg, out, out, 1, **kwargs).total
    ceiling = estimate_memory(cfg, out, out, out // cfg.block_px, **kwargs).total
    print(f"\n### Batch size chosen for a budget, {out}x{out} output{', offloaded' if offload else ''}\n")
    print(_row(["budget MiB", "n", "model MiB", "measured MiB", "measured <= budget"]))
    print(_row(["---"] * 5))
    for budget in [floor * 0.9] + [floor + (ceiling - floor) * f for f in (0.0, 0.05, 0.2, 0.5, 1.0)]:
        options = UpscaleOptions(scale=4, steps=1, budget_bytes=budget, offload=offload)
        try:
            plan = plan_stage(weights, out, out, options)
        except BudgetTooSmall:
            print(_row([_mb(budget), "refused: below the minimum", "", "", ""]))
            continue
        if not fits(weights, budget, device):
            print(_row([_mb(budget), plan.n, _mb(plan.total), "more than this GPU has free", ""]))
            continue
        peak = measure(weights, side, options, device)
        print(_row([_mb(budget), plan.n, _mb(plan.total), _mb(peak), "yes" if peak <= budget else "NO"]))


def released_weight_bytes(dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the released DiT (RoPE tables included) and its CLIP tower in ``dtype``, counted
    without building them."""
    with torch.device("meta"):
        modules = (InfDiT(RELEASED), ClipVisionEncoder(ClipVisionConfig()))
    elements = sum(t.numel() for m in modules for t in (*m.parameters(), *m.buffers()))
    return elements * torch.empty((), dtype=dtype).element_size()


def released_derived(cases: list[tuple[int, int]], margin: float) -> None:
    """The budget rule for the released model in bf16: arithmetic on the memory model, no run."""
    kwargs = dict(weight_bytes=released_weight_bytes(), dtype=torch.bfloat16)
    print("\n### Released model (bf16), derived from the memory model, not measured\n")
    print(f"n chosen for a budget (with the node's {margin:.0%} CUDA headroom); host RAM that offloading "
          "uses (at the offloaded n) for the sampler's full-image buffers and the neighbour-key strip.\n")
    print(_row(["output", "budget GiB", "n, cache on GPU", "n, offloaded", "host RAM offloaded GiB"]))
    print(_row(["---"] * 5))
    for side, budget in cases:
        cells, n = [f"{side}x{side}", budget], 1
        for offload in (False, True):
            try:
                n = choose_batch_size(RELEASED, side, side, budget * GiB, margin=margin, offload=offload, **kwargs).n
                cells.append(n)
            except BudgetTooSmall:
                cells.append("below the minimum")
        host = offloaded_host_bytes(RELEASED, side, side, n, dtype=torch.bfloat16)
        print(_row(cells + [f"{host / GiB:.1f}"]))
    for offload in (False, True):
        floor = estimate_memory(RELEASED, 16384, 16384, 1, offload=offload, **kwargs)
        print(f"\n16384x16384, n = 1{', offloaded' if offload else ''}: {floor.summary()}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ultrares.benchmarks infdit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes only (about a minute on a CPU)")
    args = parser.parse_args(argv)
    print(f"Measured {stamp()}\n")
    if torch.cuda.is_available():
        device = torch.device("cuda")
        weights = tiny_weights(cfg=RELEASED, clip_cfg=ClipVisionConfig(), dtype=torch.bfloat16)
        weights.net.to(device)
        weights.clip.to(device)
        sides = [256, 512] if args.quick else [256, 512, 1024]
        label = "released configuration (754 M DiT + ViT-L/14), random weights, bf16"
        single_thread = contextlib.nullcontext()
    else:
        device, weights = torch.device("cpu"), tiny_weights()
        sides = [32, 64, 128] if args.quick else [32, 64, 128, 256]
        label = "tiny model (2 layers, width 64, 16-px blocks), fp32, CPU: live-tensor meter"
        single_thread = threads(1)
    print(f"Inf-DiT memory, {label}; one 4x upscale with one Heun step (one evaluation) per row.")
    print(METHOD)
    with single_thread:
        full_vs_scheduled(weights, sides, 2, device)
        budgets(weights, sides[-1], device, offload=False)
        budgets(weights, sides[-1], device, offload=True)
    released_derived(DERIVED_CASES, allocator_headroom(torch.device("cuda")))


if __name__ == "__main__":
    main()
