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
every evaluation of a sample. Across evaluations, a batch's next evaluation needs only its
own pixels of this one (the sampler's update is per pixel) and, again, its dependencies' keys.

**Several ranks.** :func:`plan_ranks` deals the sweep's *lines* (the batch rows of a
row-major sweep, the batch columns of a column-major one) to P ranks in contiguous stripes
(:func:`assign_stripes`), and each rank's :class:`Schedule` is the same policy run over that
rank's own batches, in sweep order: a block another rank computes is *received* (it arrives
on the device before the first of this rank's batches that reads it, and is then cached,
read, dropped and offloaded like any other), and a block that another rank reads is *sent*
as soon as each layer has computed it. The blocks that cross between two ranks are listed in
the same order on both sides (checked), so a first-in-first-out channel per pair of ranks
carries them.

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
import functools
from dataclasses import dataclass
from typing import ContextManager, Literal, Protocol

import torch

ScanOrder = Literal["auto", "row", "column"]
SCAN_ORDERS: tuple[str, ...] = ("auto", "row", "column")

Block = tuple[int, int]

SENDS_IN_FLIGHT = 2
"""Batches whose sends may be unfinished at once on a rank: before a batch starts, the sends of
the batch two before it are waited for, so send buffers stay bounded (counted in
:attr:`Schedule.device_peak`)."""


@dataclass(frozen=True)
class BlockBatch:
    """A rectangle of blocks computed in one network pass: block rows ``rows``, columns ``cols``."""

    rows: range
    cols: range

    @functools.cached_property
    def blocks(self) -> tuple[Block, ...]:
        return tuple((i, j) for i in self.rows for j in self.cols)

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
class Transfer:
    """Blocks of one batch that cross to or from another rank: their K/V in every layer."""

    peer: int
    """The rank they come from (a receive) or go to (a send)."""
    blocks: tuple[Block, ...]
    """In the order of the producing batch's blocks (row-major), the order of the message."""


@dataclass(frozen=True)
class CacheSteps:
    """What one batch does with the neighbour cache, in each layer, in this order."""

    receive: tuple[Transfer, ...]
    """Blocks computed by other ranks that arrive before this batch reads (one transfer per
    producing batch, in sweep order): cached on the device, then treated like stored blocks."""
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
    send: tuple[Transfer, ...]
    """Its own blocks that batches on other ranks read, per rank (in rank order): sent as soon
    as a layer has computed them."""
    device_blocks: int
    """Cached blocks on the device once these steps are done."""
    host_blocks: int
    """Cached blocks on the host once these steps are done."""


@dataclass(frozen=True)
class Schedule:
    """One evaluation on one rank as plain data: its batches in order, what each depends on,
    its cache steps (with one rank: the whole sweep)."""

    batches: tuple[BlockBatch, ...]
    depends_on: tuple[tuple[int, ...], ...]
    """Per batch, the earlier batches whose blocks it reads: the edges of the batch DAG, as
    positions in the whole sweep (on any rank)."""
    steps: tuple[CacheSteps, ...]
    offload: bool
    grid: tuple[int, int] = (0, 0)
    """Block rows and columns of the whole image."""
    positions: tuple[int, ...] = ()
    """Position of each of these batches in the whole sweep."""
    rank: int = 0

    @property
    def cache_peak(self) -> int:
        """The most cached blocks (per layer) on the device at any time, received ones included.

        Every batch drops and offloads before it stores, so the count peaks once some batch's
        steps are done, or when its received blocks have arrived (their buffers exist from the
        batch's start). Entries read from the host are copied straight into the batch's key
        grid, so they add nothing here.
        """
        peak, before = 0, 0
        for steps in self.steps:
            arrived = before + sum(len(transfer.blocks) for transfer in steps.receive)
            peak, before = max(peak, arrived, steps.device_blocks), steps.device_blocks
        return peak

    @property
    def send_peak(self) -> int:
        """The most blocks (per layer) in send buffers at once: :data:`SENDS_IN_FLIGHT` batches."""
        sent = max((sum(len(transfer.blocks) for transfer in steps.send) for steps in self.steps), default=0)
        return SENDS_IN_FLIGHT * sent

    @property
    def device_peak(self) -> int:
        """Blocks (per layer) of K/V this rank holds on the device at most: cache and send buffers."""
        return self.cache_peak + self.send_peak

    @property
    def sent_blocks(self) -> int:
        """Blocks (each with its K/V in every layer) this rank sends per evaluation."""
        return sum(len(transfer.blocks) for steps in self.steps for transfer in steps.send)

    @property
    def host_peak(self) -> int:
        """The most cached blocks (per layer) waiting on the host at any time."""
        return max((steps.host_blocks for steps in self.steps), default=0)


def _sweep(batches: list[BlockBatch]) -> tuple[dict[Block, int], list[tuple[Block, ...]]]:
    """Which batch computes each block, and the outside blocks each batch reads; refuses an
    order that reads a block before it exists."""
    owner = {block: index for index, batch in enumerate(batches) for block in batch.blocks}
    reads = [tuple(sorted({src for _, _, src in batch.outside_sources()})) for batch in batches]
    for index, read in enumerate(reads):
        for block in read:
            if owner.get(block, len(batches)) >= index:
                raise ValueError(f"batch {index} reads block {block} before it is computed: "
                                 "the batch order is not a valid UniBA order")
    return owner, reads


def plan_schedule(batches: list[BlockBatch], offload: bool = False, owners: tuple[int, ...] | None = None,
                  rank: int = 0) -> Schedule:
    """The cache policy, for the batches of ``rank`` (``owners[i]``: the rank of batch ``i``;
    default: one rank owns all). Each batch receives the blocks other ranks computed for it,
    reads its outside neighbours, then drops the blocks it was the last to read, then
    (offloading) moves to the host the device blocks the next batch does not read, then
    stores its own blocks that later batches of this rank read (on the host if the next batch
    does not read them) and sends those that other ranks read. Refuses an order that reads a
    block before it exists."""
    return _plan_rank(batches, _sweep(batches), offload, owners, rank)


def _crossing(sweep: tuple[dict[Block, int], list[tuple[Block, ...]]],
              owners: tuple[int, ...]) -> dict[int, dict[int, set[Block]]]:
    """Per producing batch, per other rank: the blocks of that batch the rank reads."""
    owner, reads = sweep
    crossing: dict[int, dict[int, set[Block]]] = {}
    for index, read in enumerate(reads):
        for block in read:
            if owners[owner[block]] != owners[index]:
                crossing.setdefault(owner[block], {}).setdefault(owners[index], set()).add(block)
    return crossing


def _plan_rank(batches: list[BlockBatch], sweep: tuple[dict[Block, int], list[tuple[Block, ...]]], offload: bool,
               owners: tuple[int, ...] | None, rank: int,
               crossing: dict[int, dict[int, set[Block]]] | None = None) -> Schedule:
    owners = tuple(owners) if owners is not None else (0,) * len(batches)
    if len(owners) != len(batches):
        raise ValueError(f"{len(owners)} owners for {len(batches)} batches")
    owner, reads = sweep
    mine = [index for index, batch_rank in enumerate(owners) if batch_rank == rank]
    first_reader: dict[Block, int] = {}
    last_reader: dict[Block, int] = {}
    for index in mine:
        for block in reads[index]:
            first_reader.setdefault(block, index)
            last_reader[block] = index
    crossing = _crossing(sweep, owners) if crossing is None else crossing
    arrivals: dict[int, list[Transfer]] = {}
    for producer in sorted(crossing):
        if rank in crossing[producer]:
            blocks = tuple(b for b in batches[producer].blocks if b in crossing[producer][rank])
            arrivals.setdefault(min(first_reader[b] for b in blocks), []).append(Transfer(owners[producer], blocks))
    on_device: set[Block] = set()
    on_host: set[Block] = set()
    steps = []
    for position, index in enumerate(mine):
        batch = batches[index]
        read_next = set(reads[mine[position + 1]]) if position + 1 < len(mine) else set()
        receive = tuple(arrivals.get(index, ()))
        on_device.update(block for transfer in receive for block in transfer.blocks)
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
        send = tuple(Transfer(peer, tuple(b for b in batch.blocks if b in blocks))
                     for peer, blocks in sorted(crossing.get(index, {}).items()))
        steps.append(CacheSteps(receive=receive, read=reads[index], drop=drop, offload=offloaded, store=store,
                                store_on_host=store_on_host, send=send, device_blocks=len(on_device),
                                host_blocks=len(on_host)))
    depends_on = tuple(tuple(sorted({owner[block] for block in reads[index]})) for index in mine)
    grid = (max((b.rows.stop for b in batches), default=0), max((b.cols.stop for b in batches), default=0))
    return Schedule(tuple(batches[index] for index in mine), depends_on, tuple(steps), offload, grid, tuple(mine),
                    rank)


def assign_stripes(batches: list[BlockBatch], scan: Literal["row", "column"], ranks: int) -> tuple[int, ...]:
    """The rank of each batch: the sweep's lines (batch rows of a row-major sweep, batch columns
    of a column-major one) in ``ranks`` contiguous stripes, the larger stripes last.

    Only a stripe's last line is read by another rank (the first line of the next stripe), so
    blocks only ever travel from rank r to rank r + 1; each rank keeps just its stripe of the
    image, and a rank starts an evaluation as soon as the stripe above has produced that
    evaluation's keys for it.
    """
    if ranks < 1:
        raise ValueError(f"need at least one rank, got {ranks}")
    line_of: dict[int, int] = {}
    lines = [line_of.setdefault(batch.rows.start if scan == "row" else batch.cols.start, len(line_of))
             for batch in batches]
    count = len(line_of)
    sizes = [count // ranks + (rank >= ranks - count % ranks) for rank in range(ranks)]
    owner_of_line = [rank for rank, size in enumerate(sizes) for _ in range(size)]
    return tuple(owner_of_line[line] for line in lines)


@functools.lru_cache(maxsize=64)
def plan_ranks(grid_rows: int, grid_cols: int, n: int, scan: ScanOrder = "auto", offload: bool = False,
               ranks: int = 1) -> tuple[Schedule, ...]:
    """Every rank's schedule of one evaluation of a ``grid_rows x grid_cols``-block image in n x n
    batches, the lines dealt in stripes (:func:`assign_stripes`). Checks that what one rank
    sends to another is listed in the order the other receives it. (Plans are immutable, so
    recent ones are kept: planning asks for the same ones repeatedly.)"""
    resolved = resolve_scan(grid_rows, grid_cols, scan)
    batches = plan_batches(grid_rows, grid_cols, n, resolved)
    owners = assign_stripes(batches, resolved, ranks)
    sweep = _sweep(batches)
    crossing = _crossing(sweep, owners)
    schedules = tuple(_plan_rank(batches, sweep, offload, owners, rank, crossing) for rank in range(ranks))
    for sender in schedules:
        for receiver in schedules:
            sent = [t.blocks for steps in sender.steps for t in steps.send if t.peer == receiver.rank]
            received = [t.blocks for steps in receiver.steps for t in steps.receive if t.peer == sender.rank]
            if sent != received:
                raise ValueError(f"rank {sender.rank} sends blocks to rank {receiver.rank} in an order it does not "
                                 "receive them")
    return schedules


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
