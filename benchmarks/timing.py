"""One timed call of a benchmarked function: on a GPU the clock stops only after the queued
kernels have finished, or a launch would be timed instead of the work."""

from __future__ import annotations

import time
from collections.abc import Callable

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
