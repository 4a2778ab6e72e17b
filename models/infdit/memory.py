"""The memory model: device bytes of a block-scheduled sample, and the batch size n for a budget.

Terms (``u`` = one token's hidden vector in the model dtype, ``T`` tokens in the largest batch,
``E`` tokens of its extended grid — one extra block row and column):

- weights: the DiT and CLIP parameters, as loaded;
- sampler state: x, D, the Heun slope and the Euler step (fp32 ``[B, 3, H, W]``), the
  upsampled LR and the cross-attention LR image (model dtype), all on the host with offloading;
- neighbour cache: the most blocks the schedule keeps on the device
  (:attr:`.schedule.Schedule.device_peak`: cached, received and being sent), times layers
  times K and V;
- batch activations: the peak of one layer, reached while the keys and values are gathered:
  the hidden state, the fused QKV output, rotated queries and keys, the extended key/value
  grids and the four-segment keys and values — ``ACTIVATION_UNITS * T + E`` units of ``u`` —
  and layer 0's LR windows, or, if larger, building the keys and values of the LR region
  under the batch tile by tile (:class:`.evaluate.LRContext`); plus, throughout, that LR region, the
  RoPE tables and the batch's pixels.

With several ranks the estimate is per rank, for the rank that needs the most: its band of
the sampler state (:class:`.shard.ImageShard`; the cross-attention LR image is whole on
every rank) and its own schedule's cache (:func:`.schedule.plan_ranks`).

Attention itself is assumed fused (PyTorch's flash/efficient kernels on GPU and its flash
kernel on CPU), i.e. no ``L x 4L`` score matrix. The benchmark measures peaks against this
model side by side, and a test checks the model never underestimates on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import NamedError
from .config import InfDiTConfig
from .evaluate import TILE_BLOCKS
from .schedule import ScanOrder, Schedule, plan_ranks
from .shard import ImageShard

ACTIVATION_UNITS = 15
"""Hidden-vector copies per batch token at the peak of a layer (see the module docstring)."""
LR_TILE_UNITS = 8
"""Hidden-vector copies per LR token while one tile of LR keys and values is computed:
projection (1), fused keys/values (2), normalised keys (1), stacked result (2), and the copies
the Linear makes of its permuted input and output (2, measured on the CPU)."""
SAMPLER_BUFFERS = 4
"""fp32 full-image buffers of the Heun sampler: x, D, the slope and the Euler step."""
GiB = 2 ** 30
MEMORY_UNITS = (("GiB", GiB), ("MiB", 2 ** 20), ("KiB", 2 ** 10))


def memory_text(size: float) -> str:
    """Bytes of memory in the unit that reads best, about three digits: ``"9.87 GiB"``,
    ``"14.2 GiB"``, ``"640 MiB"``, ``"12.0 KiB"``, ``"512 bytes"`` (a tiny model's budget reads
    as a size too, never as ``"0.00 GiB"``)."""
    for unit, scale in MEMORY_UNITS:
        if abs(size) >= scale:
            value = float(f"{size / scale:.3g}")
            digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2
            return f"{value:.{digits}f} {unit}"
    return f"{size:.0f} bytes"


class BudgetTooSmall(NamedError, ValueError):
    """Even one block per batch does not fit the memory budget."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Device bytes of a sample with n x n batches, by term (see the module docstring)."""

    n: int
    weights: int
    state: int
    cache: int
    activations: int
    ranks: int = 1
    """With several ranks: the terms are those of the rank that needs the most."""

    @property
    def total(self) -> int:
        return self.weights + self.state + self.cache + self.activations

    def summary(self) -> str:
        parts = [("weights", self.weights), ("sampler state", self.state), ("neighbour cache", self.cache),
                 ("batch activations", self.activations)]
        per_rank = f" per rank ({self.ranks} ranks)" if self.ranks > 1 else ""
        return (" + ".join(f"{name} {memory_text(value)}" for name, value in parts)
                + f" = {memory_text(self.total)}{per_rank}")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def lr_tile_bytes(cfg: InfDiTConfig, dtype: torch.dtype, images: int = 1) -> int:
    """Peak bytes of computing one tile of LR keys and values (its pixels included)."""
    side = TILE_BLOCKS * cfg.lr_block
    pixels = images * 3 * (side * cfg.lr_patch) ** 2 * _itemsize(dtype)
    return images * side * side * LR_TILE_UNITS * cfg.hidden * _itemsize(dtype) + pixels


def activation_bytes(cfg: InfDiTConfig, rows: int, cols: int, dtype: torch.dtype, images: int = 1) -> int:
    """Peak bytes of one batch of ``rows x cols`` blocks inside a layer."""
    unit = cfg.hidden * _itemsize(dtype)
    tokens = images * rows * cols * cfg.block_tokens
    extended = images * (rows + 1) * (cols + 1) * cfg.block_tokens
    rope = tokens * (2 * cfg.head_dim * 4 + 2 * 8)
    pixels = tokens * cfg.patch * cfg.patch * cfg.out_channels * 4
    lr_region = 2 * images * (rows + 2) * (cols + 2) * cfg.lr_block ** 2 * unit
    lr_windows = 2 * images * rows * cols * cfg.lr_window_tokens * unit
    layer = (ACTIVATION_UNITS * tokens + extended) * unit + lr_windows
    region_build = tokens * unit + lr_tile_bytes(cfg, dtype, images)
    return rope + pixels + lr_region + max(layer, region_build)


def _state_bytes(cfg: InfDiTConfig, height: int, width: int, dtype: torch.dtype, images: int,
                 band_fraction: float = 1.0) -> int:
    """Sampler buffers of ``band_fraction`` of the image, and the whole cross-attention LR image."""
    pixels = images * cfg.out_channels * height * width
    band = int(pixels * band_fraction)
    return band * (SAMPLER_BUFFERS * 4 + _itemsize(dtype)) + pixels // cfg.lr_scale ** 2 * _itemsize(dtype)


def _block_kv_bytes(cfg: InfDiTConfig, dtype: torch.dtype, images: int) -> int:
    """K and V of one block in one layer."""
    return 2 * images * cfg.block_tokens * cfg.hidden * _itemsize(dtype)


def block_bytes(cfg: InfDiTConfig, dtype: torch.dtype, images: int = 1) -> int:
    """K and V of one block in every layer: what crosses between ranks per boundary block."""
    return cfg.layers * _block_kv_bytes(cfg, dtype, images)


def _band_fraction(schedule: Schedule, cfg: InfDiTConfig, grid: tuple[int, int]) -> float:
    shard = ImageShard.of(schedule, cfg.block_px)
    return len(shard.band) / grid[0 if shard.axis == -2 else 1] if grid[0] and grid[1] else 0.0


def estimate_memory(cfg: InfDiTConfig, height: int, width: int, n: int, *, weight_bytes: int, dtype: torch.dtype,
                    offload: bool, scan: ScanOrder = "auto", images: int = 1, ranks: int = 1) -> MemoryEstimate:
    """Device bytes of sampling a ``height x width`` output (whole blocks) with n x n batches
    (per rank, for the rank that needs the most, with several ``ranks``)."""
    grid = (height // cfg.block_px, width // cfg.block_px)
    activations = activation_bytes(cfg, min(n, grid[0]), min(n, grid[1]), dtype, images)
    estimates = []
    for schedule in plan_ranks(*grid, n, scan, offload, ranks):
        state = 0 if offload else _state_bytes(cfg, height, width, dtype, images, _band_fraction(schedule, cfg, grid))
        estimates.append(MemoryEstimate(n=n, weights=weight_bytes, state=state,
                                        cache=schedule.device_peak * _block_kv_bytes(cfg, dtype, images) * cfg.layers,
                                        activations=activations, ranks=ranks))
    return max(estimates, key=lambda estimate: estimate.total)


def offloaded_host_bytes(cfg: InfDiTConfig, height: int, width: int, n: int, *, dtype: torch.dtype,
                         scan: ScanOrder = "auto", images: int = 1, ranks: int = 1) -> int:
    """Host RAM that offloading takes for what the device does not hold: the sampler state and
    the strip of cached neighbour keys (the input and output images come on top); per rank,
    the most any rank takes, with several ``ranks``."""
    grid = (height // cfg.block_px, width // cfg.block_px)
    return max(_state_bytes(cfg, height, width, dtype, images, _band_fraction(schedule, cfg, grid))
               + schedule.host_peak * cfg.layers * _block_kv_bytes(cfg, dtype, images)
               for schedule in plan_ranks(*grid, n, scan, True, ranks))


def choose_batch_size(cfg: InfDiTConfig, height: int, width: int, budget_bytes: float, *, margin: float = 0.0,
                      **kwargs) -> MemoryEstimate:
    """The largest n whose estimate, plus ``margin`` (a fraction, for allocator overhead), fits.

    Raises :class:`BudgetTooSmall` with the n = 1 breakdown when nothing fits.
    """
    largest = max(height, width) // cfg.block_px
    grid = (height // cfg.block_px, width // cfg.block_px)
    for n in range(max(largest, 1), 0, -1):
        # Weights and activations need no schedule: skip the n they alone rule out.
        floor = kwargs["weight_bytes"] + activation_bytes(cfg, min(n, grid[0]), min(n, grid[1]), kwargs["dtype"],
                                                          kwargs.get("images", 1))
        if floor * (1 + margin) > budget_bytes:
            continue
        estimate = estimate_memory(cfg, height, width, n, **kwargs)
        if estimate.total * (1 + margin) <= budget_bytes:
            return estimate
    need = estimate_memory(cfg, height, width, 1, **kwargs)
    hint = "" if kwargs.get("offload") else "; offloading the cache to the CPU lowers it"
    raise BudgetTooSmall(
        f"a memory budget of {memory_text(budget_bytes)} is below the minimum for a {width}x{height} output "
        f"({need.summary()} with one block per batch{'' if not margin else f', plus {margin:.0%} headroom'}){hint}")
