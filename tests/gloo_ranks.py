"""Run a test function on N real ranks: N fresh processes joined in a gloo process group.

``run_ranks("module:function", n, *args)`` starts the processes (``spawn``: nothing inherited
but the import path), binds this checkout as ``ultrares`` in each, gives each one intra-op thread,
calls ``function(rank, world_size, *args)`` and returns the ranks' results in rank order. A rank
that raises fails the call with its traceback; a rank still running at the time limit, or left
waiting for a failed peer, is killed. No process outlives the call.
"""

from __future__ import annotations

import importlib
import importlib.util
import multiprocessing
import os
import queue
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


class RankFailed(AssertionError):
    """A rank raised, or did not finish in time."""


def _bind_checkout() -> None:
    spec = importlib.util.spec_from_file_location("ultrares", REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["ultrares"] = module
    spec.loader.exec_module(module)


def _rank_main(rank: int, world_size: int, store: str, target: str, args: tuple, results: Any) -> None:
    import torch
    import torch.distributed as dist

    try:
        _bind_checkout()
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
        module, name = target.split(":")
        value = getattr(importlib.import_module(module), name)(rank, world_size, *args)
        results.put((rank, True, value))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(target: str, world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """``target(rank, world_size, *args)`` on ``world_size`` gloo ranks; their results in rank order."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    outcomes: dict[int, tuple[bool, Any]] = {}
    with tempfile.TemporaryDirectory() as folder:
        store = os.path.join(folder, "store")
        processes = [context.Process(target=_rank_main, args=(rank, world_size, store, target, args, results),
                                     daemon=True) for rank in range(world_size)]
        try:
            for process in processes:
                process.start()
            deadline = time.monotonic() + timeout
            while len(outcomes) < world_size and not any(not ok for ok, _ in outcomes.values()):
                try:
                    rank, ok, value = results.get(timeout=max(0.1, deadline - time.monotonic()))
                except queue.Empty:
                    if time.monotonic() >= deadline:
                        break
                    continue
                outcomes[rank] = (ok, value)
        finally:
            for process in processes:
                process.join(timeout=5 if len(outcomes) == world_size else 0.5)
                if process.is_alive():
                    process.kill()
                    process.join()
    failed = {rank: value for rank, (ok, value) in outcomes.items() if not ok}
    if failed:
        rank = min(failed)
        raise RankFailed(f"rank {rank} of {world_size} raised:\n{failed[rank]}")
    if len(outcomes) < world_size:
        missing = sorted(set(range(world_size)) - set(outcomes))
        raise RankFailed(f"ranks {missing} of {world_size} did not finish within {timeout:.0f} s")
    return [outcomes[rank][1] for rank in range(world_size)]
