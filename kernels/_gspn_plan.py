"""How a GSPN scan is cut into Triton programs, and the bytes each kernel moves (pure Python).

A program owns one (image, channel block, chunk) strip and walks the chunk's steps; a step
needs the whole previous column, so rows are never split across programs, channels are.
Two kernel paths (``kernels/_gspn_triton.py``):

- *resident*: the whole column (``block_r >= rows``) fits one tile of at most
  :data:`TILE_ELEMENTS` with at least :data:`MIN_BLOCK_C` channels; the state stays in
  registers and its row neighbours come from an on-chip gather;
- *streamed*: taller maps; row tiles, and the previous step read back from an fp32 state
  buffer.

:func:`traffic` is the exact global-memory traffic of one call as the kernels are written
(tests compare it with every load and store the interpreted kernels make); caches are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._gspn_reference import accumulation_dtype

TILE_ELEMENTS = 2048  # rows x channels of one step tile
MAX_BLOCK_C = 32
# Channels are split down to this many per program when the map would otherwise give fewer
# programs than the GPU has SMs (the global variant at batch 1): 4 bf16 channels are 8 bytes per
# row, the neighbouring channel blocks read the rest of each 32-byte sector at the same step.
MIN_BLOCK_C = 4
# 8 elements per thread: compiled for sm_75-sm_90, the largest tile (2048 elements on 8 warps)
# takes at most 255 registers without spilling in both kernels; 16 warps (128 registers each)
# would spill.
ELEMENTS_PER_THREAD = 8
MAX_WARPS = 8
DEFAULT_SM_COUNT = 132
"""SMs assumed where no GPU is asked (interpreter, ahead-of-time builds): an H100/H200 SXM."""


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class ScanPlan:
    """How one call is cut into programs; ``resident`` picks the kernel path."""

    steps: int
    rows: int
    chunks: int
    block_r: int
    block_c: int
    num_warps: int
    resident: bool
    programs: int


def geometry(shape: tuple[int, ...], direction: int) -> tuple[int, int, int, int, int]:
    """(steps, rows, origin pixel, pixel stride along the scan, pixel stride across it) of a
    channels-last ``(N, H, W, C)`` map scanned in ``direction``."""
    _, height, width, _ = shape
    if direction == 0:
        return width, height, 0, 1, width
    if direction == 1:
        return height, width, 0, width, 1
    if direction == 2:
        return width, height, width - 1, -1, width
    return height, width, (height - 1) * width, -width, 1


def plan_scan(shape: tuple[int, ...], direction: int, chunk: int, sms: int = DEFAULT_SM_COUNT) -> ScanPlan:
    """Tiles and programs of a call on an ``(N, H, W, C)`` map, for a GPU with ``sms`` SMs.

    Channels per program start at :data:`MAX_BLOCK_C` (fewer where a resident tile would
    exceed :data:`TILE_ELEMENTS`) and are halved, down to :data:`MIN_BLOCK_C`, while there
    are fewer programs than SMs.
    """
    n, _, _, channels = shape
    steps, rows, _, _, _ = geometry(shape, direction)
    chunks = _cdiv(steps, chunk)
    full_rows = _next_power_of_2(rows)
    block_c = min(_next_power_of_2(channels), MAX_BLOCK_C)
    resident = full_rows * min(block_c, MIN_BLOCK_C) <= TILE_ELEMENTS
    if resident:
        block_c = min(block_c, TILE_ELEMENTS // full_rows)
    while block_c > MIN_BLOCK_C and n * _cdiv(channels, block_c) * chunks < sms:
        block_c //= 2
    block_r = full_rows if resident else min(full_rows, max(1, TILE_ELEMENTS // block_c))
    warps = min(MAX_WARPS, max(1, block_r * block_c // (32 * ELEMENTS_PER_THREAD)))
    return ScanPlan(steps, rows, chunks, block_r, block_c, warps, resident, n * _cdiv(channels, block_c) * chunks)


@dataclass(frozen=True)
class Traffic:
    """Bytes one call moves to and from global memory, by tensor (``"load x"``, ``"store out"``...)."""

    parts: dict[str, int]

    @property
    def loads(self) -> int:
        return sum(v for k, v in self.parts.items() if k.startswith("load"))

    @property
    def stores(self) -> int:
        return sum(v for k, v in self.parts.items() if k.startswith("store"))

    @property
    def total(self) -> int:
        return self.loads + self.stores


def _parts(values: int, carried: int, neighbours: int, size: int, acc: int, resident: bool, pass_: str,
           save_state: bool) -> dict[str, int]:
    """Traffic from three counts: all values, those whose step propagates (not a chunk's first)
    and their row neighbours (the row above plus the row below, where they exist)."""
    if pass_ == "forward":
        parts = {"load x": values * size, "load lam": values * size, "load logits": 3 * carried * size,
                 "store out": values * size}
        if (save_state or not resident) and acc != size:
            parts["store state"] = values * acc
        if not resident:
            parts["load state"] = (carried + neighbours) * acc
        return parts
    if pass_ != "backward":
        raise ValueError(f"pass_ must be 'forward' or 'backward', got {pass_!r}")
    parts = {"load dy": values * size, "load logits": 3 * carried * size, "load x": values * size,
             "load lam": values * size, "load state": carried * acc, "store dx": values * size,
             "store dlam": values * size, "store dlogits": 3 * values * size}
    if not resident:
        # The state's row neighbours, and the dh buffer: written every step, the next column read
        # for each row it feeds, with that column's gates re-made from its logits for each of them.
        parts["load state"] += neighbours * acc
        parts["store dh"] = values * acc
        parts["load dh"] = (carried + neighbours) * acc
        parts["load logits"] += 3 * (carried + neighbours) * size
    return parts


def traffic(shape: tuple[int, ...], direction: int, chunk: int, dtype: torch.dtype, pass_: str = "forward",
            save_state: bool = False, sms: int = DEFAULT_SM_COUNT) -> Traffic:
    """Exact global-memory bytes of one kernel call (``pass_``: ``"forward"`` or ``"backward"``;
    ``save_state``: the forward also stores the fp32 state for a backward pass)."""
    n, height, width, channels = shape
    plan = plan_scan(shape, direction, chunk, sms)
    values = n * height * width * channels
    carried = n * (plan.steps - plan.chunks) * plan.rows * channels
    neighbours = 2 * n * (plan.steps - plan.chunks) * max(plan.rows - 1, 0) * channels
    return Traffic(_parts(values, carried, neighbours, _bytes(dtype), _bytes(accumulation_dtype(dtype)),
                          plan.resident, pass_, save_state))


def bytes_per_step(dtype: torch.dtype, pass_: str, resident: bool = True, save_state: bool = False) -> int:
    """Bytes per pixel and channel of a step that propagates, on an inner row (both neighbours)."""
    return sum(_parts(1, 1, 2, _bytes(dtype), _bytes(accumulation_dtype(dtype)), resident, pass_,
                      save_state).values())


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
