"""What one rank of a distributed upscale runs, however it was started.

A rank joins the run's process group from a rendezvous store (:func:`.exchange.join`), loads
the weights itself (:class:`.checkpoint.WeightSource`) onto its device and runs
:func:`upscale_job`: the ranks plan together (:func:`plan_on_ranks`: every rank measures the
memory free on its own device, and all plan from the least of them, so they agree on the
batch size), rank 0 publishes the plan, and every rank runs the pipeline of
:func:`.upscale.upscale` on its part of every sweep.
``torchrun`` starts ranks for the command line (``cli/infdit_upscale.py``); :mod:`.launch`
starts them as local processes, for a host such as ComfyUI, with :func:`main` as their entry:
the job comes from a folder, the result of rank 0 goes back into it, a failure is written to
the store (the first one is the cause; later ones are ranks losing their peers), and a rank
stopped through the store's stop flag exits with :data:`STOPPED_EXIT`.
"""

from __future__ import annotations

import importlib
import os
import time
import traceback
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..weight_files import write_atomically
from .budget import BudgetPlan, UpscaleOptions, plan_budget, total_batches
from .checkpoint import InfDiTWeights, WeightSource
from .exchange import RankGroup, Stopped, join
from .progress import PreviewCanvas, UpscaleStep, encode_piece
from .upscale import upscale

DEVICE_ENV = "ULTRARES_RANK_DEVICE"
THREADS_ENV = "ULTRARES_RANK_THREADS"
JOB_FILE, RESULT_FILE = "job.pt", "result.pt"
FAILURES_KEY = "failures"
STOPPED_EXIT = 3
STORE_TIMEOUT = timedelta(minutes=30)
PREVIEW_SECONDS = 1.0
"""How often a rank publishes its band of the preview (and at the first batch of every stage)."""


def failure_key(sequence: int) -> str:
    """Store key of the ``sequence``-th failure of a run (1: the first)."""
    return f"failure/{sequence}"


def host_free_bytes() -> float:
    """Host RAM available (``inf`` where it cannot be read)."""
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as info:
            return next(float(line.split()[1]) * 1024 for line in info if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return float("inf")


def ranks_per_host(group: RankGroup) -> int:
    """Ranks sharing this machine's RAM (``torchrun`` and :mod:`.launch` say; else all)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", group.ranks))


def plan_on_ranks(group: RankGroup, weights: InfDiTWeights, size: tuple[int, int], options: UpscaleOptions) -> BudgetPlan:
    """The plan of every rank, the same on all: from the least device memory free on any rank
    once its weights are loaded (a CPU rank counts its share of the host's RAM) and the least
    host RAM free."""
    host = host_free_bytes()
    free = torch.cuda.mem_get_info(group.device)[0] if group.device.type == "cuda" else host / ranks_per_host(group)
    free, host = group.agree_on_least(free, host)
    return plan_budget(weights, size, options, free, host if host != float("inf") else None, group.ranks,
                       ranks_per_host(group))


class RankReports:
    """After each of a rank's batches: its status line and, now and then (at a stage's first
    batch, every :data:`PREVIEW_SECONDS` and at its last batch), its band of the preview."""

    def __init__(self, group: RankGroup, canvas: PreviewCanvas | None):
        self.group, self.canvas = group, canvas
        self.sent_at, self.sent_stage = 0.0, 0

    def __call__(self, step: UpscaleStep) -> None:
        self.group.report_status(step.describe())
        if self.canvas is None:
            return
        now = time.monotonic()
        if (self.canvas.stage != self.sent_stage or now - self.sent_at >= PREVIEW_SECONDS
                or step.done == step.total):
            self.group.report_preview(encode_piece(self.canvas))
            self.sent_at, self.sent_stage = now, self.canvas.stage


def upscale_job(group: RankGroup, *, weights: dict, images: torch.Tensor, options: dict,
                preview: bool = True) -> torch.Tensor | None:
    """One rank's part of :func:`.upscale.upscale` (``weights``: a :class:`WeightSource` as a
    dict, ``options``: the request, :class:`UpscaleOptions` as a dict), planned on the ranks;
    rank 0 publishes the plan and returns the images. Every rank reports where it is and, with
    ``preview``, its band of the preview (:class:`RankReports`)."""
    loaded = WeightSource(**weights).load()
    loaded.net.to(group.device)
    if loaded.clip is not None:
        loaded.clip.to(group.device)
    size = (images.shape[-2], images.shape[-1])
    plan = plan_on_ranks(group, loaded, size, UpscaleOptions(**options))
    if group.rank == 0:
        group.publish_plan(total_batches(loaded, size, images.shape[0], plan.options, group.ranks),
                           list(plan.messages),
                           plan.describe(size, images.shape[0], group.ranks,
                                         "GPU memory" if group.device.type == "cuda" else "CPU RAM"))
    canvas = PreviewCanvas(loaded.net.cfg.block_px) if preview else None
    return upscale(loaded, images, plan.options, group.device,
                   on_progress=lambda done, total: group.report_batch(), check_interrupt=group.check_interrupt,
                   group=group, on_step=RankReports(group, canvas), preview=canvas)


def upscale_job_arguments(weights: WeightSource, images: torch.Tensor, options: UpscaleOptions,
                          preview: bool = True) -> dict[str, Any]:
    """The keyword arguments of :func:`upscale_job`, as plain data a job file can hold."""
    return {"weights": asdict(weights), "images": images.float().cpu().contiguous(), "options": asdict(options),
            "preview": preview}


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
            with write_atomically(Path(job_dir) / RESULT_FILE) as partial:
                torch.save(result, partial)
        group.close()
        return 0
    except Stopped:
        return STOPPED_EXIT
    except BaseException as error:  # noqa: BLE001  (reported to whoever started the ranks)
        report_failure(control, rank, device, error)
        traceback.print_exc()
        return 1
