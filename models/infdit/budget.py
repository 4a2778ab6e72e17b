"""The plan of an upscale: its stages, the batch size of each, and what a budget allows.

One *stage* is one 2x or 4x pass (8 = 4 then 2, 16 = 4 then 4); its output is padded to
whole blocks. The batch size n of a stage is given, or the largest whose memory model
(:mod:`.memory`) fits the budget, or, without a budget, one batch over the whole image.
Offloading gives the same result, so a budget that only fits with it switches it on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .checkpoint import InfDiTWeights
from .memory import BudgetTooSmall, MemoryEstimate, choose_batch_size, estimate_memory
from .schedule import ScanOrder

STAGES: dict[int, tuple[int, ...]] = {2: (2,), 4: (4,), 8: (4, 2), 16: (4, 4)}


@dataclass(frozen=True)
class UpscaleOptions:
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


def stage_factors(scale: int) -> tuple[int, ...]:
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


def plan_stage(weights: InfDiTWeights, height: int, width: int, options: UpscaleOptions) -> MemoryEstimate:
    """The batch size n for one stage's padded output, from the options and the memory model."""
    cfg = weights.net.cfg
    kwargs = dict(weight_bytes=weight_bytes(weights), dtype=weights.net.dtype, offload=options.offload,
                  scan=options.scan)
    if options.batch_blocks is not None:
        return estimate_memory(cfg, height, width, options.batch_blocks, **kwargs)
    if options.budget_bytes is None:
        return estimate_memory(cfg, height, width, max(height, width) // cfg.block_px, **kwargs)
    return choose_batch_size(cfg, height, width, options.budget_bytes, margin=options.margin, **kwargs)


def stage_plans(weights: InfDiTWeights, size: tuple[int, int], options: UpscaleOptions) -> list[MemoryEstimate]:
    """The memory plan of every stage for an input of ``size`` (raises :class:`BudgetTooSmall`)."""
    return [plan_stage(weights, height, width, options)
            for height, width in stage_sizes(weights, size, stage_factors(options.scale))]


def fit_budget(weights: InfDiTWeights, size: tuple[int, int], options: UpscaleOptions) -> UpscaleOptions:
    """``options``, with offloading switched on when the budget fits only that way.

    Offloading gives the same result (more slowly, using host RAM), so a budget too small for
    the neighbour cache and full-image buffers on the device is met with it rather than
    refused. Raises :class:`BudgetTooSmall` when even one block per batch, offloaded, does not fit.
    """
    try:
        stage_plans(weights, size, options)
        return options
    except BudgetTooSmall:
        if options.offload:
            raise
    offloaded = replace(options, offload=True)
    stage_plans(weights, size, offloaded)
    return offloaded
