"""The block schedule of one evaluation: the batches, their order, the neighbour K/V they
exchange, and where tensors live.

Under UniBA, block (i, j) attends to (i-1, j-1), (i, j-1) and (i-1, j) (clamped at the top
and left border), so any order in which those come first is valid. The sweep cuts the
block grid into n x n batches (ragged at the right and bottom edges) and visits them
row-major or column-major; the strip of K/V kept between batches then spans the image
width or height, so ``"auto"`` scans along the shorter side.

**The cache policy** lives here and nowhere else. :func:`plan_schedule` turns the batches
into a :class:`Schedule`: per batch, the blocks it reads from the neighbour cache and the
steps that follow (drop, offload, store), with the number of blocks each place then holds.
The cache (:class:`.evaluate.NeighbourCache`) carries out these steps, in every layer, and the
memory model (:mod:`.memory`) counts them; neither decides anything itself.

A schedule is plain data (block coordinates and batch indices, no tensors), the same for
every evaluation of a sample. An executor that shares the batches among several devices
reads from it which blocks cross between them: a batch's dependencies are the batches that
own the blocks it reads, and a stored block is read by the batches that list it in
``read``. Across evaluations, a batch's next evaluation needs only its own pixels of this
one (the sampler's update is per pixel) and, again, its dependencies' keys.

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
    """A rectangle of blocks computed in one network pass: block rows ``rows``, columns ``cols``."""

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


@dataclass(frozen=True)
class CacheSteps:
    """What one batch does with the neighbour cache, in each layer, in this order."""

    read: tuple[Block, ...]
    """Its neighbours outside the batch (above and to the left), read into its key grid."""
    drop: tuple[Block, ...]
    """Cached blocks no later batch reads: freed, wherever they are."""
    offload: tuple[Block, ...]
    """Cached blocks on the device that the next batch does not read: moved to the host."""
    store: tuple[Block, ...]
    """Its own blocks that later batches read, cached on the device."""
    store_on_host: tuple[Block, ...]
    """Its own blocks that later batches read but the next one does not: cached on the host."""
    device_blocks: int
    """Cached blocks on the device once these steps are done."""
    host_blocks: int
    """Cached blocks on the host once these steps are done."""


@dataclass(frozen=True)
class Schedule:
    """One evaluation as plain data: the batches in order, what each depends on, its cache steps."""

    batches: tuple[BlockBatch, ...]
    depends_on: tuple[tuple[int, ...], ...]
    """Per batch, the earlier batches whose blocks it reads: the edges of the batch DAG."""
    steps: tuple[CacheSteps, ...]
    offload: bool

    @property
    def device_peak(self) -> int:
        """The most cached blocks (per layer) on the device at any time.

        Every batch drops and offloads before it stores, so the count peaks once some batch's
        steps are done. Entries read from the host are copied straight into the batch's key
        grid, so they add nothing here.
        """
        return max((steps.device_blocks for steps in self.steps), default=0)

    @property
    def host_peak(self) -> int:
        """The most cached blocks (per layer) waiting on the host at any time."""
        return max((steps.host_blocks for steps in self.steps), default=0)


def plan_schedule(batches: list[BlockBatch], offload: bool = False) -> Schedule:
    """The cache policy: each batch reads its outside neighbours, then drops the blocks it was
    the last to read, then (offloading) moves to the host the device blocks the next batch
    does not read, then stores its own blocks that later batches read (on the host if the
    next batch does not read them). Refuses an order that reads a block before it exists."""
    owner = {block: index for index, batch in enumerate(batches) for block in batch.blocks}
    reads = [tuple(sorted({src for _, _, src in batch.outside_sources()})) for batch in batches]
    last_reader: dict[Block, int] = {}
    for index, read in enumerate(reads):
        for block in read:
            if owner.get(block, len(batches)) >= index:
                raise ValueError(f"batch {index} reads block {block} before it is computed: "
                                 "the batch order is not a valid UniBA order")
            last_reader[block] = index
    on_device: set[Block] = set()
    on_host: set[Block] = set()
    steps = []
    for index, batch in enumerate(batches):
        read_next = set(reads[index + 1]) if index + 1 < len(batches) else set()
        drop = tuple(block for block in reads[index] if last_reader[block] == index)
        on_device.difference_update(drop)
        on_host.difference_update(drop)
        offloaded = tuple(sorted(on_device - read_next)) if offload else ()
        on_device.difference_update(offloaded)
        on_host.update(offloaded)
        kept = [block for block in batch.blocks if block in last_reader]
        store = tuple(block for block in kept if not offload or block in read_next)
        store_on_host = tuple(block for block in kept if offload and block not in read_next)
        on_device.update(store)
        on_host.update(store_on_host)
        steps.append(CacheSteps(reads[index], drop, offloaded, store, store_on_host, len(on_device), len(on_host)))
    depends_on = tuple(tuple(sorted({owner[block] for block in read})) for read in reads)
    return Schedule(tuple(batches), depends_on, tuple(steps), offload)


HOST = torch.device("cpu")


class HostObserver(Protocol):
    """Told about host allocations and host-side work (a memory meter, on a CPU-only machine)."""

    def host_work(self) -> ContextManager[None]: ...


@dataclass
class Placement:
    """Where an evaluation keeps its tensors: it computes on ``device``; with ``offload``,
    what grows with the image waits on the host."""

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
