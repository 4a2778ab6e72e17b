"""The plan of an upscale: its stages, the batch size of each, and what a budget allows.

One *stage* is one 2x or 4x pass (8 = 4 then 2, 16 = 4 then 4); its output is padded to
whole blocks. The batch size n of a stage is given, or the largest whose memory model
(:mod:`.memory`) fits the budget, or, without a budget, one batch over the whole image.
Offloading gives the same result, so a budget that only fits with it switches it on.

With several ranks the budget is per rank (each rank's device holds its own copy of the
weights), the memory model counts the rank that needs the most, and n is the largest that
fits unless a slightly smaller one keeps the ranks markedly busier
(:func:`.pipeline.ranks_batch_size`).

Where a host manages device memory (ComfyUI), planning has two moments: before the model is
loaded, :func:`working_memory` says how much to have freed for the request; once it is
loaded, :func:`plan_budget` turns the request and the memory then free into the plan, with
what is worth telling the user.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from .checkpoint import InfDiTWeights
from .memory import BudgetTooSmall, MemoryEstimate, choose_batch_size, estimate_memory, memory_text, offloaded_host_bytes
from .pipeline import ranks_batch_size
from .sampler import evaluations
from .schedule import ScanOrder, plan_batches, plan_ranks

CUDA_HEADROOM = 0.1
"""Fraction added to the memory model on CUDA for the caching allocator's fragmentation."""

STAGES: dict[int, tuple[int, ...]] = {2: (2,), 4: (4,), 8: (4, 2), 16: (4, 4)}


@dataclass(frozen=True)
class UpscaleOptions:
    """What to upscale how: the sampling settings, and what the plan may use."""

    scale: int = 4
    steps: int = 20
    seed: int = 0
    init_noise: bool = True
    """Start from the upsampled LR plus noise (the released setting) instead of pure noise."""
    budget_bytes: float | None = None
    """Device memory for the whole sample; ``None``: no limit (one batch if nothing is given)."""
    batch_blocks: int | None = None
    """Fixed n (blocks per batch side), overriding the budget."""
    scan: ScanOrder = "auto"
    offload: bool = False
    margin: float = 0.0
    """Headroom on top of the memory model when choosing n (fraction)."""


def weight_bytes(weights: InfDiTWeights) -> int:
    """Device bytes of the loaded model: parameters and buffers (the RoPE tables)."""
    modules = [weights.net] + ([weights.clip] if weights.clip is not None else [])
    return sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers()))


def allocator_headroom(device: torch.device | str) -> float:
    """The :attr:`UpscaleOptions.margin` for ``device``: CUDA's caching allocator fragments."""
    return CUDA_HEADROOM if torch.device(device).type == "cuda" else 0.0


def stage_factors(scale: int) -> tuple[int, ...]:
    """The 2x and 4x passes of an upscale by ``scale``."""
    if scale not in STAGES:
        raise ValueError(f"scale must be one of {sorted(STAGES)} (2x and 4x passes), got {scale}")
    return STAGES[scale]


def stage_sizes(weights: InfDiTWeights, size: tuple[int, int], factors: tuple[int, ...]) -> list[tuple[int, int]]:
    """Sampled (padded) output size of each stage: the input of a stage is padded to whole blocks."""
    sizes, (height, width) = [], size
    for factor in factors:
        multiple = weights.net.cfg.block_px // factor
        sizes.append((-(-height // multiple) * multiple * factor, -(-width // multiple) * multiple * factor))
        height, width = height * factor, width * factor
    return sizes


def plan_stage(weights: InfDiTWeights, height: int, width: int, options: UpscaleOptions,
               ranks: int = 1) -> MemoryEstimate:
    """The batch size n for one stage's padded output, from the options and the memory model
    (per rank, with several ``ranks``)."""
    cfg = weights.net.cfg
    kwargs = dict(weight_bytes=weight_bytes(weights), dtype=weights.net.dtype, offload=options.offload,
                  scan=options.scan, ranks=ranks)
    if options.batch_blocks is not None:
        return estimate_memory(cfg, height, width, options.batch_blocks, **kwargs)
    if options.budget_bytes is None:
        largest = max(height, width) // cfg.block_px
    else:
        largest = choose_batch_size(cfg, height, width, options.budget_bytes, margin=options.margin, **kwargs).n
    n = ranks_batch_size(height // cfg.block_px, width // cfg.block_px, largest, options.scan, ranks,
                         evaluations(options.steps))
    return estimate_memory(cfg, height, width, n, **kwargs)


def stage_plans(weights: InfDiTWeights, size: tuple[int, int], options: UpscaleOptions,
                ranks: int = 1) -> list[MemoryEstimate]:
    """The memory plan of every stage for an input of ``size`` (raises :class:`BudgetTooSmall`)."""
    return [plan_stage(weights, height, width, options, ranks)
            for height, width in stage_sizes(weights, size, stage_factors(options.scale))]


def fit_budget(weights: InfDiTWeights, size: tuple[int, int], options: UpscaleOptions,
               ranks: int = 1) -> UpscaleOptions:
    """``options``, with offloading switched on when the budget fits only that way.

    Offloading gives the same result (more slowly, using host RAM), so a budget too small for
    the neighbour cache and full-image buffers on the device is met with it rather than
    refused. Raises :class:`BudgetTooSmall` when even one block per batch, offloaded, does not fit.
    """
    try:
        stage_plans(weights, size, options, ranks)
        return options
    except BudgetTooSmall:
        if options.offload:
            raise
    offloaded = replace(options, offload=True)
    stage_plans(weights, size, offloaded, ranks)
    return offloaded


def working_memory(weights: InfDiTWeights, size: tuple[int, int], options: UpscaleOptions, ranks: int = 1) -> int:
    """Device bytes beyond the weights to have free before planning ``options``: what the plan
    for the requested budget needs or, without one, the least that works (one offloaded block
    per batch); per rank with several ``ranks``. Raises :class:`BudgetTooSmall`."""
    need = fit_budget(weights, size, options, ranks) if options.budget_bytes is not None else \
        replace(options, offload=True, batch_blocks=1)
    return max(plan.total for plan in stage_plans(weights, size, need, ranks)) - weight_bytes(weights)


def total_batches(weights: InfDiTWeights, size: tuple[int, int], images: int, options: UpscaleOptions,
                  ranks: int = 1) -> int:
    """Block batches of a whole upscale (every evaluation of every stage of every image, all
    ranks together): the total of its progress bar."""
    block_px = weights.net.cfg.block_px
    per_evaluation = sum(len(plan_batches(height // block_px, width // block_px, plan.n, options.scan))
                         for (height, width), plan in zip(stage_sizes(weights, size, stage_factors(options.scale)),
                                                          stage_plans(weights, size, options, ranks)))
    return per_evaluation * evaluations(options.steps) * images


@dataclass(frozen=True)
class BudgetPlan:
    """An upscale as it will run, and what the user should hear about it."""

    options: UpscaleOptions
    """The request with the budget planned for and the offloading decided."""
    stages: tuple[MemoryEstimate, ...]
    messages: tuple[tuple[int, str], ...]
    """``(logging level, text)`` pairs, in order."""
    outputs: tuple[tuple[int, int], ...] = ()
    """Each stage's sampled (padded) output ``(height, width)``."""
    batches: tuple[int, ...] = ()
    """Each stage's block batches per network evaluation (per rank: the busiest one's)."""
    budget_bytes: float = 0.0
    budget_source: str = "available"
    """Where the budget comes from: ``"requested"`` (as asked), ``"lowered"`` (asked for more than
    is free) or ``"available"`` (no request: what is free once the model is loaded)."""
    offload_source: str = "off"
    """``"requested"``, ``"needed"`` (switched on: the budget fits only so) or ``"off"``."""
    host_bytes: float | None = None
    """Host RAM that offloading takes (the largest stage), when on."""

    def describe(self, size: tuple[int, int], images: int = 1, ranks: int = 1, memory: str = "GPU memory") -> str:
        """The plan in a few lines for the user, before the work starts: the output, the batch
        size and the work it makes, the memory and why (``size``: the input ``(height, width)``;
        ``memory``: what the device's memory is called, e.g. ``"CPU RAM"`` on the CPU)."""
        factor, (height, width) = self.options.scale, size
        head = f"{factor}× upscale → {width * factor}×{height * factor}"
        if images > 1:
            head += f", {images} images"
        if ranks > 1:
            head += f", shared by {ranks} devices"
        lines = [head]
        count = evaluations(self.options.steps)
        for stage, (estimate, batches) in enumerate(zip(self.stages, self.batches)):
            label = f"pass {stage + 1}: " if len(self.stages) > 1 else ""
            lines.append(f"{label}{estimate.n}×{estimate.n} blocks per batch, {batches} batch"
                         f"{'es' if batches != 1 else ''} × {count} evaluations")
        why = {"requested": "the VRAM budget you set", "lowered": "all that is free (you asked for more)",
               "available": "all that is free once the model is loaded"}[self.budget_source]
        per = " per device" if ranks > 1 else ""
        lines.append(f"{memory}{per}: about {memory_text(max(e.total for e in self.stages))} of "
                     f"{memory_text(self.budget_bytes)} ({why})")
        if self.offload_source != "off":
            reason = "you switched it on" if self.offload_source == "requested" else "needed to fit the budget"
            host = f": about {memory_text(self.host_bytes)}" if self.host_bytes is not None else ""
            lines.append(f"offloaded to CPU RAM{host} ({reason}; same result, slower)")
        return "\n".join(lines)


def plan_budget(weights: InfDiTWeights, size: tuple[int, int], options: UpscaleOptions, free_bytes: float,
                host_free_bytes: float | None = None, ranks: int = 1, ranks_per_host: int | None = None) -> BudgetPlan:
    """The plan for ``options`` with the model loaded and ``free_bytes`` of device memory free
    (with several ``ranks``: on each rank's device, the least of them; the plan is per rank,
    and ``ranks_per_host`` of them, all by default, share the host's RAM).

    The budget (weights included) is the requested one, lowered to what is available, or all
    that is available without a request; offloading is switched on if only it fits. The
    messages give the largest stage's batch size and memory, and say when the budget was
    lowered, when offloading was switched on, when it would allow twice the batch size, and
    when it needs more than ``host_free_bytes`` of host RAM. Raises :class:`BudgetTooSmall`.
    """
    requested, available = options.budget_bytes, free_bytes + weight_bytes(weights)
    budget = available if requested is None else min(requested, available)
    source = "available" if requested is None else "lowered" if budget < requested else "requested"
    messages: list[tuple[int, str]] = []
    if source == "lowered":
        messages.append((logging.WARNING, f"the VRAM budget of {memory_text(requested)} is more than the "
                                          f"{memory_text(available)} available with the model loaded; planning for "
                                          f"{memory_text(budget)}"))
    planned = fit_budget(weights, size, replace(options, budget_bytes=budget), ranks)
    if planned.offload and not options.offload:
        messages.append((logging.INFO, f"the neighbour keys and full-image buffers do not fit {memory_text(budget)} "
                                       "of device memory: keeping them in CPU RAM instead (same result, slower)"))
    stages = stage_plans(weights, size, planned, ranks)
    outputs = stage_sizes(weights, size, stage_factors(planned.scale))
    block_px = weights.net.cfg.block_px
    batches = tuple(max(len(schedule.batches) for schedule in plan_ranks(h // block_px, w // block_px, plan.n,
                                                                         planned.scan, planned.offload, ranks))
                    for (h, w), plan in zip(outputs, stages))
    largest = stages[-1]
    messages.append((logging.INFO, f"{largest.n} x {largest.n} blocks per batch: {largest.summary()}"))
    host = None
    if not planned.offload:
        offloaded = stage_plans(weights, size, replace(planned, offload=True), ranks)[-1].n
        if offloaded >= 2 * largest.n:
            messages.append((logging.INFO, f"with offloading on, the same budget allows {offloaded} x {offloaded} "
                                           "blocks per batch (fewer, larger batches; uses CPU RAM)"))
    else:
        height, width = outputs[-1]
        host = offloaded_host_bytes(weights.net.cfg, height, width, largest.n, dtype=weights.net.dtype,
                                    scan=planned.scan, ranks=ranks) * (ranks_per_host or ranks)
        if host_free_bytes is not None and host > host_free_bytes:
            messages.append((logging.WARNING, f"offloading needs about {memory_text(host)} of CPU RAM for a "
                                              f"{width}x{height} output, {memory_text(host_free_bytes)} is free"))
    offload_source = "requested" if options.offload else "needed" if planned.offload else "off"
    return BudgetPlan(planned, tuple(stages), tuple(messages), tuple(outputs), batches, budget, source,
                      offload_source, host)
