"""The block schedule of one evaluation: the batches, their order, the neighbour K/V they
exchange, and where tensors live.

Under UniBA, block (i, j) attends to (i-1, j-1), (i, j-1) and (i-1, j) (clamped at the top
and left border), so any order in which those come first is valid. The sweep cuts the
block grid into n x n batches (ragged at the right and bottom edges) and visits them
row-major or column-major; the strip of K/V kept between batches then spans the image
width or height, so ``"auto"`` scans along the shorter side.

:class:`CacheSchedule` says, for each batch, which blocks outside it it reads, which of its
own blocks later batches read, and after which batch each stored block can be dropped. Both
the evaluation and the memory model use it, so the model counts exactly what is kept.

**Placement.** Compute always happens on ``device``. With ``offload``, everything whose size
grows with the image (the cached K/V strip, the LR cross-attention keys, the sampler's
full-image buffers) lives in host memory and only the slices a batch needs travel to the
device, so device memory stays flat as the image grows.

An optional :class:`HostObserver` wraps every host allocation made here and the host-side
preparation work; on a CPU-only machine, where host and device are the same memory, a memory
meter (the benchmarks' ``LiveTensorMeter``) uses it to tell the two apart.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager, Literal, Protocol

import torch

ScanOrder = Literal["auto", "row", "column"]
SCAN_ORDERS: tuple[str, ...] = ("auto", "row", "column")

Block = tuple[int, int]


@dataclass(frozen=True)
class BlockBatch:
    rows: range
    cols: range

    @property
    def blocks(self) -> list[Block]:
        return [(i, j) for i in self.rows for j in self.cols]

    def __contains__(self, block: Block) -> bool:
        return block[0] in self.rows and block[1] in self.cols

    def extended_source(self, a: int, b: int) -> Block:
        """Block shown at position (a, b) of the extended grid (one extra row above, column left).

        Clamping at the top and left image border reproduces the released model's duplication
        rule: a missing neighbour is the nearest block inside the image.
        """
        return max(self.rows.start - 1 + a, 0), max(self.cols.start - 1 + b, 0)

    def outside_sources(self) -> list[tuple[int, int, Block]]:
        """``(a, b, block)`` for extended-grid cells whose block is not in this batch."""
        cells = [(0, b) for b in range(len(self.cols) + 1)] + [(a, 0) for a in range(1, len(self.rows) + 1)]
        return [(a, b, src) for a, b in cells if (src := self.extended_source(a, b)) not in self]


def resolve_scan(grid_rows: int, grid_cols: int, requested: ScanOrder) -> Literal["row", "column"]:
    """Row-major keeps a strip as wide as the image, column-major one as tall: pick the shorter."""
    if requested not in SCAN_ORDERS:
        raise ValueError(f"unknown scan order {requested!r}; expected one of {SCAN_ORDERS}")
    if requested == "auto":
        return "row" if grid_cols <= grid_rows else "column"
    return requested


def plan_batches(grid_rows: int, grid_cols: int, n: int, scan: ScanOrder = "auto") -> list[BlockBatch]:
    """n x n block batches covering the grid in a valid UniBA order."""
    if n < 1:
        raise ValueError(f"batch size must be at least 1 block, got {n}")
    row_starts, col_starts = range(0, grid_rows, n), range(0, grid_cols, n)
    pairs = ([(r, c) for r in row_starts for c in col_starts] if resolve_scan(grid_rows, grid_cols, scan) == "row"
             else [(r, c) for c in col_starts for r in row_starts])
    return [BlockBatch(range(r, min(r + n, grid_rows)), range(c, min(c + n, grid_cols))) for r, c in pairs]


class CacheSchedule:
    """Which neighbour blocks each batch reads from the cache, stores for later, and drops."""

    def __init__(self, batches: list[BlockBatch]):
        self.batches = batches
        owner = {block: index for index, batch in enumerate(batches) for block in batch.blocks}
        self.needs: list[list[Block]] = []
        self.last_use: dict[Block, int] = {}
        for index, batch in enumerate(batches):
            needed = sorted({src for _, _, src in batch.outside_sources()})
            for block in needed:
                if owner.get(block, len(batches)) >= index:
                    raise ValueError(f"batch {index} reads block {block} before it is computed: "
                                     "the batch order is not a valid UniBA order")
                self.last_use[block] = index
            self.needs.append(needed)
        self.stores: list[list[Block]] = [[b for b in batch.blocks if b in self.last_use] for batch in batches]

    def needed_next(self, index: int) -> set[Block]:
        """Blocks the batch after ``index`` reads (kept on the device when offloading)."""
        return set(self.needs[index + 1]) if index + 1 < len(self.needs) else set()

    def device_blocks(self, offload: bool) -> int:
        """Peak number of cached blocks per layer held on the device, replaying the cache's rules.

        A batch's update drops the blocks it was the last to read and (offloading) moves the
        ones the next batch does not read to the host *before* storing its own, so a layer's
        count peaks after some update. Host entries are copied straight into the batch's key
        buffer, so they add nothing here.
        """
        return self._replay(offload)[0]

    def host_blocks(self) -> int:
        """Peak number of cached blocks per layer waiting in host memory when offloading."""
        return self._replay(True)[1]

    def _replay(self, offload: bool) -> tuple[int, int]:
        on_device: set[Block] = set()
        on_host: set[Block] = set()
        device_peak = host_peak = 0
        for index in range(len(self.batches)):
            keep_next = self.needed_next(index)
            dropped = {b for b in self.needs[index] if self.last_use[b] == index}
            on_device -= dropped
            on_host -= dropped
            if offload:
                on_host |= on_device - keep_next
                on_device &= keep_next
            for block in self.stores[index]:
                (on_device if not offload or block in keep_next else on_host).add(block)
            device_peak, host_peak = max(device_peak, len(on_device)), max(host_peak, len(on_host))
        return device_peak, host_peak


HOST = torch.device("cpu")


class HostObserver(Protocol):
    def host_work(self) -> ContextManager[None]: ...


@dataclass
class Placement:
    device: torch.device
    offload: bool = False
    observer: HostObserver | None = None

    def host_work(self) -> ContextManager[None]:
        """Wraps work done in host memory whatever the device (resizing, drawing noise)."""
        return self.observer.host_work() if self.observer is not None else contextlib.nullcontext()

    @property
    def store_device(self) -> torch.device:
        """Device of tensors that grow with the image: the host when offloading."""
        return HOST if self.offload else self.device

    def _empty_host(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        with self.host_work():
            return torch.empty(shape, dtype=dtype, device=HOST, pin_memory=self.device.type == "cuda")

    def empty_store(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised image-sized buffer on :attr:`store_device`."""
        if self.offload:
            return self._empty_host(shape, dtype)
        return torch.empty(shape, dtype=dtype, device=self.device)

    def to_store(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of ``t`` on :attr:`store_device` that owns its memory (never a view into ``t``)."""
        out = self.empty_store(tuple(t.shape), t.dtype)
        out.copy_(t)
        return out

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy of ``t`` (used for cache entries the next batch does not need).

        Asynchronous from a GPU (into pinned memory): such a copy is only ever read by later
        copies back to the device on the same stream, so the sweep need not wait for it.
        """
        out = self._empty_host(tuple(t.shape), t.dtype)
        out.copy_(t, non_blocking=True)
        return out

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the compute device: a view when it is already there, else a copy. Offloaded
        tensors are always copied, also when host and device are the same memory (CPU), so that
        a memory meter sees the copy a GPU would hold."""
        return t.to(self.device, non_blocking=True, copy=self.offload)
