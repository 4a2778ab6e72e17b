"""What one rank of a distributed upscale runs, however it was started.

A rank joins the run's process group from a rendezvous store (:func:`.exchange.join`), loads
the weights itself (:class:`.checkpoint.WeightSource`) onto its device and runs
:func:`upscale_job`: the pipeline of :func:`.upscale.upscale` on its part of every sweep.
``torchrun`` starts ranks for the command line (``cli/infdit_upscale.py``); :mod:`.launch`
starts them as local processes, for a host such as ComfyUI, with :func:`main` as their entry:
the job comes from a folder, the result of rank 0 goes back into it, a failure is written to
the store (the first one is the cause; later ones are ranks losing their peers), and a rank
stopped through the store's stop flag exits with :data:`STOPPED_EXIT`.
"""

from __future__ import annotations

import importlib
import os
import traceback
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .budget import UpscaleOptions
from .checkpoint import WeightSource
from .exchange import RankGroup, Stopped, join
from .upscale import upscale

DEVICE_ENV = "ULTRARES_RANK_DEVICE"
THREADS_ENV = "ULTRARES_RANK_THREADS"
JOB_FILE, RESULT_FILE = "job.pt", "result.pt"
FAILURES_KEY = "failures"
STOPPED_EXIT = 3
STORE_TIMEOUT = timedelta(minutes=30)


def failure_key(sequence: int) -> str:
    """Store key of the ``sequence``-th failure of a run (1: the first)."""
    return f"failure/{sequence}"


def upscale_job(group: RankGroup, *, weights: dict, images: torch.Tensor, options: dict) -> torch.Tensor | None:
    """One rank's part of :func:`.upscale.upscale` (``weights``: a :class:`WeightSource` as a
    dict, ``options``: :class:`UpscaleOptions` as a dict); rank 0 returns the images."""
    loaded = WeightSource(**weights).load()
    loaded.net.to(group.device)
    if loaded.clip is not None:
        loaded.clip.to(group.device)
    return upscale(loaded, images, UpscaleOptions(**options), group.device,
                   on_progress=lambda done, total: group.report_batch(), check_interrupt=group.check_interrupt,
                   group=group)


def upscale_job_arguments(weights: WeightSource, images: torch.Tensor, options: UpscaleOptions) -> dict[str, Any]:
    """The keyword arguments of :func:`upscale_job`, as plain data a job file can hold."""
    return {"weights": asdict(weights), "images": images.float().cpu().contiguous(), "options": asdict(options)}


def resolve(target: str):
    """``"package.module:function"`` -> the function."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def report_failure(control: dist.Store, rank: int, device: torch.device, error: BaseException) -> None:
    """Write ``error`` as this run's next failure (best effort: the store may be gone)."""
    try:
        sequence = control.add(FAILURES_KEY, 1)
        control.set(failure_key(sequence), f"rank {rank} ({device}): {type(error).__name__}: {error}")
    except Exception:  # noqa: BLE001  (nothing left to tell)
        pass


def main(target: str, job_dir: str) -> int:
    """Entry of a rank started by :mod:`.launch` (rank, world size, store address and device in
    the environment); returns the exit status."""
    rank, ranks = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device(os.environ.get(DEVICE_ENV, "cpu"))
    if os.environ.get(THREADS_ENV):
        torch.set_num_threads(int(os.environ[THREADS_ENV]))
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=STORE_TIMEOUT)
    control = dist.PrefixStore("control/", store)
    try:
        group = join(store, rank, ranks, device)
        job = torch.load(Path(job_dir) / JOB_FILE, weights_only=True)
        result = resolve(target)(group, **job)
        if rank == 0:
            partial = Path(job_dir) / (RESULT_FILE + ".partial")
            torch.save(result, partial)
            os.replace(partial, Path(job_dir) / RESULT_FILE)
        group.close()
        return 0
    except Stopped:
        return STOPPED_EXIT
    except BaseException as error:  # noqa: BLE001  (reported to whoever started the ranks)
        report_failure(control, rank, device, error)
        traceback.print_exc()
        return 1
