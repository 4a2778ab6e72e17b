"""CLEAR attention calls split into stripes, shared by the thread tests and the gloo ranks
(``run_ranks`` imports this module by name): each case builds the same random call in every
process, computes the one-device output, and the device's stripe output from its slice of the
tokens through a :class:`Communicator`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ultrares.models.clear.attention import ClearAttention, TokenLayout
from ultrares.models.clear.communicator import Communicator, MeteredCommunicator, ProcessGroupCommunicator, ThreadGroup
from ultrares.models.clear.parallel import StripeLayout
from ultrares.models.clear.pattern import ClearPattern
from ultrares.models.clear.stripes import StripePlan

BLOCK = ("single", 1)


@dataclass(frozen=True)
class Case:
    """One attention call: ``grid`` of image tokens, text and reference tokens, the window."""

    grid: tuple[int, int]
    radius: int
    down: int = 1
    n_txt: int = 5
    n_ref: int = 0
    batch: int = 1
    heads: int = 2
    dim: int = 16
    proportional: bool = False
    dtype: torch.dtype = torch.float32

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, ClearAttention]:
        g = torch.Generator().manual_seed(hash((self.grid, self.radius, self.down)) % 2**31)
        length = self.n_txt + self.grid[0] * self.grid[1] + self.n_ref
        q, k, v = [torch.randn(self.batch, self.heads, length, self.dim, generator=g) for _ in range(3)]
        spatial = {BLOCK: 1 / self.down ** 2 + 0.2 * torch.randn(self.down, self.down, generator=g)} \
            if self.down > 1 else {}
        attention = ClearAttention(ClearPattern(self.radius, self.down), spatial, self.proportional, backend="torch")
        return q, k, v, attention

    def local(self, x: torch.Tensor, plan: StripePlan, rank: int) -> torch.Tensor:
        """A device's tokens: the text, its stripe, the reference tokens."""
        tokens = plan.tokens(rank)
        image_end = self.n_txt + self.grid[0] * self.grid[1]
        return torch.cat([x[:, :, :self.n_txt], x[:, :, self.n_txt + tokens.start:self.n_txt + tokens.stop],
                          x[:, :, image_end:]], dim=2)

    def plan(self, devices: int) -> StripePlan:
        return StripePlan.split(self.grid, devices, self.radius, align=self.down)


CASES = [
    Case((9, 7), radius=3),
    Case((13, 10), radius=5, down=2, n_ref=3, batch=2),  # down-sampled keys, reference tokens, batch 2
    Case((11, 6), radius=6, n_txt=3),  # stripes of 3-4 rows, thinner than the reach of 5: halos span two devices
    Case((7, 9), radius=2, down=2, proportional=True),  # odd grid: the last row feeds no cell
    Case((10, 5), radius=12, n_txt=2),  # the window holds the whole grid: every device needs every row
]


def one_device(case: Case) -> torch.Tensor:
    q, k, v, attention = case.inputs()
    return attention(q.to(case.dtype), k.to(case.dtype), v.to(case.dtype), TokenLayout(case.grid, case.n_ref), BLOCK)


def stripe_output(case: Case, plan: StripePlan, rank: int, comm: Communicator) -> torch.Tensor:
    q, k, v, attention = case.inputs()
    layout = StripeLayout(case.grid, case.n_ref, plan, rank, comm)
    return attention(*(case.local(t, plan, rank).to(case.dtype) for t in (q, k, v)), layout, BLOCK)


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return float((out.float() - expected.float()).abs().max() / expected.float().abs().max())


def on_threads(case: Case, devices: int, metered: bool = False) -> tuple[list[torch.Tensor], list]:
    """Every device's stripe output, one thread per device, and their communicators."""
    plan = case.plan(devices)
    group = ThreadGroup(devices, timeout=60)
    comms = [group.communicator(rank, "cpu") for rank in range(devices)]
    comms = [MeteredCommunicator(c) for c in comms] if metered else comms
    outputs: list[torch.Tensor | None] = [None] * devices
    errors: list[BaseException] = []

    def work(rank: int) -> None:
        try:
            outputs[rank] = stripe_output(case, plan, rank, comms[rank])
        except BaseException as error:
            errors.append(error)
            group.abort()

    threads = [threading.Thread(target=work, args=(rank,)) for rank in range(devices)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return outputs, comms


def gloo_rank_errors(rank: int, world_size: int) -> dict[int, list[float]]:
    """Run in each gloo rank: for groups of 2 ranks (a subgroup) and of all of them, every case's
    error of this rank's tokens against one device."""
    errors = {}
    for size in (2, world_size):
        group = dist.new_group(list(range(size)))  # every rank takes part in creating every group
        if rank >= size:
            continue
        comm = ProcessGroupCommunicator(group)
        errors[size] = []
        for case in CASES:
            plan = case.plan(size)
            expected = case.local(one_device(case), plan, rank)
            errors[size].append(relative_error(stripe_output(case, plan, rank, comm), expected))
    return errors
