"""The modelled timeline of a distributed sample: how busy the ranks are, what they send, and
the batch size that keeps them busy.

A block batch costs its number of blocks (one block's network evaluation is the unit of
time) and starts when its rank is free and the batch above it in the previous line (whose
K/V it reads, with the corner's) has finished, evaluation after evaluation with no barrier
in between (the sampler's update is per pixel). Batches start only once their dependencies
have *finished*, while the executor sends each layer's keys as soon as that layer is done,
so a real batch may start earlier: the model is conservative. It leaves out transfer time
(the benchmark prints what has to be sent so that it can be compared with a link) and the
send bound (:data:`.schedule.SENDS_IN_FLIGHT`), which only slows a rank down to a slower
rank below it.

Per evaluation, the finish times of a line follow from the line above by a max-plus scan:
``f[j] = max(f[j-1], above[j]) + cost[j]``, with ``f[-1]`` the time its rank becomes free.

For comparison (the benchmark) the model also knows the assignment the executor does not
use, lines dealt round-robin (line k to rank k mod P): every line boundary then crosses
between ranks, and rank P - 1's keys wait for rank 0 to finish its whole line before they
are read (:func:`model_pipeline` with ``assignment="round-robin"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from .schedule import ScanOrder, assign_stripes, plan_batches, plan_ranks, resolve_scan

Assignment = Literal["stripes", "round-robin"]

SPEEDUP_TOLERANCE = 0.05
""":func:`ranks_batch_size` takes the largest n within this fraction of the best modelled speed-up."""


@dataclass(frozen=True)
class PipelineModel:
    """One stage's sample on ``ranks`` ranks with n x n batches, in block-evaluation units."""

    ranks: int
    n: int
    evaluations: int
    work: int
    """Block evaluations in all (the time one rank alone takes)."""
    makespan: float
    """When the last rank finishes."""
    busy: tuple[int, ...]
    """Block evaluations per rank."""
    sent_blocks: tuple[int, ...]
    """Blocks (K/V of every layer each) each rank sends per evaluation."""

    @property
    def fill(self) -> float:
        """Fraction of rank-time spent computing."""
        return self.work / (self.ranks * self.makespan) if self.makespan else 1.0

    @property
    def speedup(self) -> float:
        """Speed-up over one device, if transfers hide behind compute."""
        return self.work / self.makespan if self.makespan else 1.0


def _lines(grid_rows: int, grid_cols: int, n: int, scan: ScanOrder, ranks: int,
           assignment: Assignment) -> list[tuple[int, np.ndarray]]:
    """The sweep's lines in order: their rank and their batches' costs."""
    resolved = resolve_scan(grid_rows, grid_cols, scan)
    batches = plan_batches(grid_rows, grid_cols, n, resolved)
    owners = assign_stripes(batches, resolved, ranks)
    key = (lambda b: b.rows.start) if resolved == "row" else (lambda b: b.cols.start)
    lines: dict[int, tuple[int, list[int]]] = {}
    for batch, owner in zip(batches, owners):
        lines.setdefault(key(batch), (owner, []))[1].append(len(batch.rows) * len(batch.cols))
    if assignment == "round-robin":
        return [(index % ranks, np.array(costs, dtype=np.float64)) for index, (_, costs) in enumerate(lines.values())]
    if assignment != "stripes":
        raise ValueError(f"unknown assignment {assignment!r}")
    return [(owner, np.array(costs, dtype=np.float64)) for owner, costs in lines.values()]


def _timeline(grid_rows: int, grid_cols: int, n: int, scan: ScanOrder, ranks: int, evaluations: int,
              assignment: Assignment = "stripes") -> tuple[list[int], float]:
    """Block evaluations per rank and the makespan."""
    line_list = _lines(grid_rows, grid_cols, n, scan, ranks, assignment)
    free = np.zeros(ranks)
    for _ in range(evaluations):
        above = None
        for owner, costs in line_list:
            ready = np.zeros_like(costs) if above is None else above
            cumulative = np.cumsum(costs)
            # f[j] = cumulative[j] + max(free, max over k <= j of ready[k] - cumulative[k - 1])
            above = cumulative + np.maximum(free[owner], np.maximum.accumulate(ready - (cumulative - costs)))
            free[owner] = above[-1]
    busy = [0] * ranks
    for owner, costs in line_list:
        busy[owner] += int(costs.sum()) * evaluations
    return busy, float(free.max())


def model_pipeline(grid_rows: int, grid_cols: int, n: int, scan: ScanOrder = "auto", ranks: int = 1,
                   evaluations: int = 39, assignment: Assignment = "stripes") -> PipelineModel:
    """The modelled timeline of ``evaluations`` sweeps of a ``grid_rows x grid_cols``-block image."""
    busy, makespan = _timeline(grid_rows, grid_cols, n, scan, ranks, evaluations, assignment)
    if assignment == "stripes":
        sent = tuple(schedule.sent_blocks for schedule in plan_ranks(grid_rows, grid_cols, n, scan, False, ranks))
    else:
        # Each line's bottom block row (as wide as the strip) goes to the next line's rank.
        width = grid_cols if resolve_scan(grid_rows, grid_cols, scan) == "row" else grid_rows
        counts = [0] * ranks
        for owner, _ in _lines(grid_rows, grid_cols, n, scan, ranks, assignment)[:-1]:
            counts[owner] += width if ranks > 1 else 0
        sent = tuple(counts)
    return PipelineModel(ranks, n, evaluations, sum(busy), makespan, tuple(busy), sent)


def ranks_batch_size(grid_rows: int, grid_cols: int, largest: int, scan: ScanOrder = "auto", ranks: int = 1,
                     evaluations: int = 39) -> int:
    """The batch size for ``ranks`` ranks when memory allows up to ``largest``: the largest n
    whose modelled speed-up is within :data:`SPEEDUP_TOLERANCE` of the best n's (larger
    batches: fewer, fuller kernel launches and fewer lines whose keys cross between ranks)."""
    if ranks == 1:
        return largest
    speedups = {}
    for n in range(1, largest + 1):
        busy, makespan = _timeline(grid_rows, grid_cols, n, scan, ranks, evaluations)
        speedups[n] = sum(busy) / makespan if makespan else 1.0
    best = max(speedups.values())
    return max(n for n, speedup in speedups.items() if speedup >= (1 - SPEEDUP_TOLERANCE) * best)
