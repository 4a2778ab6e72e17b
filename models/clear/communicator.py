"""The three collective steps stripe-parallel CLEAR needs, behind one interface, for devices
driven by processes (torch.distributed) or by threads of one process (ComfyUI).

- :meth:`Communicator.exchange`: point-to-point messages (the halo rows of keys and values).
- :meth:`Communicator.all_reduce`: elementwise max or sum over the devices (the text queries'
  softmax partials). Every device gets the same bits: the in-process version adds the parts in
  rank order on each device; NCCL and gloo reduce each element once and share the result.
- :meth:`Communicator.all_gather`: the devices' pieces put together in rank order (the
  down-sampled keys, each device's own cells).

:class:`ProcessGroupCommunicator` runs them on a ``torch.distributed`` process group (gloo on
CPUs, NCCL on GPUs); :class:`ThreadGroup` hands one :class:`ThreadCommunicator` to each thread
of one process, which meet at a barrier and copy tensors device to device (peer-to-peer where
the GPUs allow it). :class:`MeteredCommunicator` counts the payload and the time of each step.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Literal, Protocol

import torch
import torch.distributed as dist

from ...errors import NamedError

ReduceOp = Literal["sum", "max"]
# How long a device waits for the others at one step before giving up: far above one attention
# call at 16K on any GPU, short enough that a lost peer does not hang the queue for good.
PEER_TIMEOUT_S = 600.0


class PeerFailed(NamedError, RuntimeError):
    """Another device of the group stopped (its own error is reported where it happened)."""


class Communicator(Protocol):
    """One device's end of a group of ``world_size`` devices; ``rank`` is its place in it."""

    rank: int
    world_size: int

    def exchange(self, sends: Mapping[int, torch.Tensor], receives: Mapping[int, torch.Tensor]) -> None:
        """Send ``sends[peer]`` to each peer and fill ``receives[peer]`` (preallocated, contiguous)
        with what each peer sent here; every message must be matched by the peer's call."""

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp) -> torch.Tensor:
        """The elementwise ``op`` of every device's ``tensor`` (same shape everywhere)."""

    def all_gather(self, tensor: torch.Tensor, sizes: Sequence[int], dim: int) -> torch.Tensor:
        """Every device's ``tensor`` (``sizes[rank]`` long along ``dim``) concatenated in rank order."""


class ProcessGroupCommunicator:
    """:class:`Communicator` on a ``torch.distributed`` process group (default: the world)."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def exchange(self, sends: Mapping[int, torch.Tensor], receives: Mapping[int, torch.Tensor]) -> None:
        ops = [dist.P2POp(dist.isend, tensor.contiguous(), self._global(peer), self.group)
               for peer, tensor in sorted(sends.items())]
        ops += [dist.P2POp(dist.irecv, tensor, self._global(peer), self.group) for peer, tensor in sorted(receives.items())]
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp) -> torch.Tensor:
        result = tensor.contiguous().clone()
        dist.all_reduce(result, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=self.group)
        return result

    def all_gather(self, tensor: torch.Tensor, sizes: Sequence[int], dim: int) -> torch.Tensor:
        # Process groups gather equal shapes: every piece is padded to the longest and cut back.
        longest = max(sizes)
        pad = list(tensor.shape)
        pad[dim] = longest - tensor.shape[dim]
        padded = torch.cat([tensor, tensor.new_zeros(pad)], dim=dim).contiguous()
        pieces = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(pieces, padded, group=self.group)
        return torch.cat([piece.narrow(dim, 0, size) for piece, size in zip(pieces, sizes)], dim=dim)


class ThreadGroup:
    """The meeting point of ``world_size`` threads of one process, one per device; hand each its
    :meth:`communicator`. A thread that fails calls :meth:`abort`, which releases every thread
    waiting at a step with :class:`PeerFailed`."""

    def __init__(self, world_size: int, timeout: float = PEER_TIMEOUT_S):
        self.world_size = world_size
        self._barrier = threading.Barrier(world_size, timeout=timeout)
        self._posted: list[object] = [None] * world_size

    def communicator(self, rank: int, device: torch.device | str) -> ThreadCommunicator:
        return ThreadCommunicator(self, rank, torch.device(device))

    def abort(self) -> None:
        self._barrier.abort()

    def _wait(self) -> None:
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            raise PeerFailed("another device of the CLEAR device group stopped or did not answer in time") from None

    def share(self, rank: int, value: object) -> list[object]:
        """Post ``value`` and return every rank's posts once all have posted; the second wait keeps
        the posts until everyone has taken them."""
        self._posted[rank] = value
        self._wait()
        posts = list(self._posted)
        self._wait()
        return posts


class ThreadCommunicator:
    """:class:`Communicator` for one thread of a :class:`ThreadGroup`, whose results live on ``device``."""

    def __init__(self, group: ThreadGroup, rank: int, device: torch.device):
        self.group = group
        self.rank = rank
        self.world_size = group.world_size
        self.device = device

    def exchange(self, sends: Mapping[int, torch.Tensor], receives: Mapping[int, torch.Tensor]) -> None:
        posts = self.group.share(self.rank, dict(sends))
        for peer, buffer in receives.items():
            buffer.copy_(posts[peer][self.rank])

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp) -> torch.Tensor:
        combine = torch.maximum if op == "max" else torch.add
        parts = self.group.share(self.rank, tensor)
        result = parts[0].to(self.device, copy=True)
        for part in parts[1:]:
            result = combine(result, part.to(self.device))
        return result

    def all_gather(self, tensor: torch.Tensor, sizes: Sequence[int], dim: int) -> torch.Tensor:
        parts = self.group.share(self.rank, tensor)
        return torch.cat([part.to(self.device) for part in parts], dim=dim)


class MeteredCommunicator:
    """A :class:`Communicator` that counts, per step kind, the bytes this device contributed
    (what it sends in an exchange, its tensor in a reduction or a gather) and the seconds spent in
    the step, waiting for the others included."""

    def __init__(self, inner: Communicator):
        self.inner = inner
        self.rank, self.world_size = inner.rank, inner.world_size
        self.bytes: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def _count(self, kind: str, payload: int, started: float) -> None:
        self.bytes[kind] += payload
        self.seconds[kind] += time.perf_counter() - started
        self.calls[kind] += 1

    def exchange(self, sends: Mapping[int, torch.Tensor], receives: Mapping[int, torch.Tensor]) -> None:
        started = time.perf_counter()
        self.inner.exchange(sends, receives)
        self._count("exchange", sum(t.numel() * t.element_size() for t in sends.values()), started)

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp) -> torch.Tensor:
        started = time.perf_counter()
        result = self.inner.all_reduce(tensor, op)
        self._count(f"all_reduce_{op}", tensor.numel() * tensor.element_size(), started)
        return result

    def all_gather(self, tensor: torch.Tensor, sizes: Sequence[int], dim: int) -> torch.Tensor:
        started = time.perf_counter()
        result = self.inner.all_gather(tensor, sizes, dim)
        self._count("all_gather", tensor.numel() * tensor.element_size(), started)
        return result
