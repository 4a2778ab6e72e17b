"""The ranks of one distributed upscale on ``torch.distributed``: the blocks' K/V between
ranks, the pixels at the end of a stage, and the run's stop flag and progress.

**Links.** Blocks only travel from a stripe to the next (:func:`.schedule.assign_stripes`),
from rank r to rank r + 1. Each such link gets a process group of its own (two ranks), so its
messages run on their own NCCL communicator and stream whether or not the default group was
initialised eagerly (then NCCL would otherwise run every point-to-point message of a rank on
one in-order stream), and the link carries messages one way only. The link groups are warmed
up with one small message each, in link order, before any work starts: NCCL creates a
communicator on its first message, and a rank that created one in the middle of a sweep would
block until its peer got there.

**Messages.** One message per (producing batch, layer, receiving rank): the K/V of the blocks
that rank reads, ``[2, B, blocks, L, heads, head_dim]`` in the model dtype, sent with
``isend`` right after the layer computed them (the network goes on with the next layer while
it travels) and received with ``irecv`` posted when the receiving batch starts, one per
layer, each waited for just before its layer needs it. Both sides list a link's messages in
the same order (checked when planning), so matching them needs nothing but the order (tags
name the layer, for gloo).

**Why it cannot deadlock.** A rank blocks in two places only: waiting for a block the rank
above sent (data), and, before a batch starts, waiting for its own sends of the batch two
before (so that send buffers stay bounded, :data:`.schedule.SENDS_IN_FLIGHT`), which finish
once the rank below has started the batch that reads them (it posts that batch's receives
before anything else). So rank r only ever waits for r - 1 (data) or r + 1 (its receives).
A cycle of waits would need r waiting for r + 1 while r + 1 waits for r: r + 1 waits for a
block of r's current batch or a later one, and reads the blocks of r's earlier batches no
later than that, so it has already posted their receives; r's wait is over. Within a link the
streams see the messages in the same order on both sides, so NCCL's in-order streams match
them one by one.

**Control.** The rendezvous store carries a stop flag (set by whoever started the ranks;
every rank checks it before each batch), a counter of finished batches over all ranks (the
progress bar), the plan rank 0 made (its progress total and what to tell the user), each
rank's last status line (where it is, :meth:`.progress.UpscaleStep.describe`) and each rank's
latest preview of its band of the image (:func:`.progress.encode_piece`).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import InfDiTConfig
from .schedule import SENDS_IN_FLIGHT, Block, Schedule
from .shard import ImageShard

STOP_KEY = "stop"
PROGRESS_KEY = "batches done"
PLAN_KEY = "plan"


def status_key(rank: int) -> str:
    """Store key of a rank's last status line."""
    return f"status/{rank}"


def preview_key(rank: int) -> str:
    """Store key of a rank's latest preview piece (its version counter: ``preview_key(rank) + " version"``)."""
    return f"preview/{rank}"


class Stopped(Exception):
    """The run was stopped from outside (the user cancelled, or another rank failed)."""


class RankGroup:
    """This process's place among the ranks of one upscale, on an initialised default group.

    Every rank constructs it at the same point (it creates process groups, a collective call).
    ``device`` is where the rank computes; messages travel on it with NCCL and through host
    memory with gloo. ``control`` is the store the run's stop flag and progress live in.
    """

    def __init__(self, device: torch.device, control: dist.Store | None = None):
        self.rank, self.ranks = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(device)
        self.comm_device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        self.control = control
        self.bytes_sent = 0
        self.total = 0
        self.on_progress: Callable[[int, int], None] | None = None
        """Told ``(batches done over all ranks, total)`` after each of this rank's batches."""
        self.on_plan: Callable[[list[tuple[int, str]]], None] | None = None
        """Rank 0: told the plan's ``(logging level, message)`` pairs when it publishes them."""
        self.links = {sender: dist.new_group([sender, sender + 1]) for sender in range(self.ranks - 1)}
        self._warm_up()

    def _warm_up(self) -> None:
        """One message per link, link after link, so every link's communicator exists."""
        token = torch.zeros(1, device=self.comm_device)
        for sender, group in self.links.items():
            if self.rank == sender:
                dist.send(token, sender + 1, group=group)
            elif self.rank == sender + 1:
                dist.recv(token, sender, group=group)

    def check_interrupt(self) -> None:
        """Raise :class:`Stopped` if the run's stop flag is set."""
        if self.control is not None and self.control.check([STOP_KEY]):
            raise Stopped("the run was stopped")

    def report_batch(self) -> None:
        """Count one finished block batch in the run's progress."""
        if self.control is not None:
            done = self.control.add(PROGRESS_KEY, 1)
            if self.on_progress is not None:
                self.on_progress(done, self.total)

    def report_status(self, text: str) -> None:
        """Say where this rank is, for whoever watches the run."""
        if self.control is not None:
            self.control.set(status_key(self.rank), text)

    def report_preview(self, piece: bytes) -> None:
        """Publish this rank's preview of its band (:func:`.progress.encode_piece`)."""
        if self.control is not None:
            self.control.set(preview_key(self.rank), piece)
            self.control.add(preview_key(self.rank) + " version", 1)

    def agree_on_least(self, *values: float) -> list[float]:
        """The smallest of each value over all ranks (a collective: every rank calls it)."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return tensor.tolist()

    def publish_plan(self, total: int, messages: list[tuple[int, str]], summary: str = "") -> None:
        """Rank 0: the run's progress total and what to tell the user (log lines and the plan in
        a few lines, :meth:`.budget.BudgetPlan.describe`), for whoever watches it."""
        self.total = total
        if self.control is not None:
            self.control.set(PLAN_KEY, json.dumps({"total": total, "messages": messages, "summary": summary}))
        if self.on_plan is not None:
            self.on_plan(messages)

    def assemble(self, local: torch.Tensor, shards: list[ImageShard], image_shape: tuple[int, ...],
                 everywhere: bool) -> torch.Tensor | None:
        """The whole image (on the host) from every rank's band ``local``: on every rank
        (``everywhere``; a broadcast per band) or on rank 0 only (others get ``None``)."""
        whole = torch.empty(image_shape, dtype=local.dtype) if everywhere or self.rank == 0 else None
        for owner, shard in enumerate(shards):
            if not shard.band:
                continue
            mine = owner == self.rank
            if not everywhere and not mine and self.rank != 0:
                continue
            band = (local.to(self.comm_device).contiguous() if mine
                    else torch.empty(shard.shape(image_shape), dtype=local.dtype, device=self.comm_device))
            if everywhere:
                dist.broadcast(band, owner)
            elif owner != 0:
                if mine:
                    dist.send(band, 0)
                else:
                    dist.recv(band, owner)
            if whole is not None:
                shard.take(whole).copy_(band)
        return whole

    def close(self) -> None:
        """Leave the process groups (after a run that finished)."""
        if dist.is_initialized():
            dist.destroy_process_group()


def join(store: dist.Store, rank: int, ranks: int, device: torch.device,
         timeout: timedelta = timedelta(minutes=30)) -> RankGroup:
    """Initialise ``torch.distributed`` from a rendezvous ``store`` (NCCL on CUDA devices, gloo
    elsewhere) and return this rank's :class:`RankGroup`."""
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=dist.PrefixStore("process group/", store), rank=rank, world_size=ranks,
                            timeout=timeout, **kwargs)
    return RankGroup(device, dist.PrefixStore("control/", store))


class BlockExchange:
    """Carries out one rank's sends and receives of a schedule (the :class:`.evaluate.Exchange`
    of :func:`.evaluate.evaluate`), evaluation after evaluation of one stage."""

    def __init__(self, group: RankGroup, schedule: Schedule, cfg: InfDiTConfig, dtype: torch.dtype, images: int = 1):
        peers = {(t.peer, "receive") for steps in schedule.steps for t in steps.receive}
        peers |= {(t.peer, "send") for steps in schedule.steps for t in steps.send}
        if peers - {(group.rank - 1, "receive"), (group.rank + 1, "send")}:
            raise ValueError(f"rank {group.rank}'s schedule exchanges blocks with {sorted(peers)}: the links carry "
                             "blocks from a rank to the next one only (stripes of lines)")
        self.group, self.schedule, self.layers = group, schedule, cfg.layers
        self.message_block = (images, cfg.block_tokens, cfg.heads, cfg.head_dim)
        self.dtype = dtype
        self._incoming: list[list[tuple[tuple[Block, ...], torch.Tensor, dist.Work]]] = []
        self._sending: deque[list[dist.Work]] = deque()

    def _link(self, sender: int) -> dist.ProcessGroup:
        return self.group.links[sender]

    def begin(self, position: int) -> None:
        """Post the receives of batch ``position`` (every layer), then wait for this rank's sends of
        the batch :data:`SENDS_IN_FLIGHT` before (receives first: the rank above may be waiting
        for them)."""
        steps = self.schedule.steps[position]
        self._incoming = [[] for _ in range(self.layers)]
        for transfer in steps.receive:
            for layer in range(self.layers):
                buffer = torch.empty((2, self.message_block[0], len(transfer.blocks), *self.message_block[1:]),
                                     dtype=self.dtype, device=self.group.comm_device)
                work = dist.irecv(buffer, transfer.peer, group=self._link(transfer.peer), tag=layer)
                self._incoming[layer].append((transfer.blocks, buffer, work))
        while len(self._sending) >= SENDS_IN_FLIGHT:
            for work in self._sending.popleft():
                work.wait()
        if steps.send:
            self._sending.append([])

    def arrivals(self, position: int, layer: int) -> Iterator[tuple[Block, torch.Tensor, torch.Tensor]]:
        """The blocks received for ``layer`` of batch ``position``, on the compute device."""
        for blocks, buffer, work in self._incoming[layer]:
            work.wait()
            buffer = buffer.to(self.group.device, non_blocking=True)
            for index, block in enumerate(blocks):
                yield block, buffer[0, :, index], buffer[1, :, index]
        self._incoming[layer] = []

    def send(self, position: int, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Send ``layer``'s K/V (block layout ``[B, rows, cols, L, heads, head_dim]``) of the
        blocks of batch ``position`` that other ranks read."""
        batch, steps = self.schedule.batches[position], self.schedule.steps[position]
        for transfer in steps.send:
            cells = [(i - batch.rows.start, j - batch.cols.start) for i, j in transfer.blocks]
            message = torch.stack([torch.stack([t[:, r, c] for r, c in cells], dim=1) for t in (k, v)])
            message = message.to(self.group.comm_device)
            work = dist.isend(message, transfer.peer, group=self._link(self.group.rank), tag=layer)
            self._sending[-1].append(work)
            self.group.bytes_sent += message.numel() * message.element_size()

    def finish(self) -> None:
        """Wait for every send still travelling (at the end of a stage)."""
        while self._sending:
            for work in self._sending.popleft():
                work.wait()
