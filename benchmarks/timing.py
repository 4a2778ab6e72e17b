"""One timed call of a benchmarked function: on a GPU the clock stops only after the queued
kernels have finished, or a launch would be timed instead of the work. And the CPU threads a
measurement runs with, restored afterwards."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch


def timed_call(fn: Callable[[], object], device: torch.device,
               clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds of one ``fn()`` by ``clock``, synchronising ``device`` before and after on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = clock()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clock() - start


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op CPU threads (small tensors: one is faster and steadier)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
