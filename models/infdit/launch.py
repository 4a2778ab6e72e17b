"""Start the ranks of a distributed upscale as local processes, and watch them until they end.

A host (the ComfyUI node, the tests, the benchmark) calls :func:`run_ranks` with a job: one
fresh Python process per device, each binding this pack by its path (no installation
needed, ComfyUI's Python serves) and entering :func:`.worker.main`. The processes meet in a
``torch.distributed`` TCP store this process serves on the loopback interface; a CUDA rank
sees only its own GPU. While they run, the host's progress callback gets the batches done
over all ranks (its total from the plan rank 0 publishes, whose messages are logged here),
its status callback every rank's last status line, its preview callback the ranks' bands of
the preview put together (:class:`.progress.PreviewMosaic`), and its interrupt check runs
every :data:`POLL_SECONDS`.

**Stopping.** If the interrupt check raises, a rank fails, or the time limit passes, the stop
flag is set (every rank checks it before each batch), the ranks get :data:`GRACE_SECONDS` to
exit and are then killed; the call returns only once none is left, so the memory they held
on their devices is free again. A failure is reported as :class:`RankFailed` with the first
rank's error (ranks losing a peer fail too, afterwards).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ...errors import NamedError
from .budget import UpscaleOptions
from .checkpoint import WeightSource
from .exchange import PLAN_KEY, PROGRESS_KEY, STOP_KEY, preview_key, status_key
from .progress import PreviewMosaic
from .worker import DEVICE_ENV, JOB_FILE, RESULT_FILE, THREADS_ENV, failure_key, upscale_job_arguments

PACK_ROOT = Path(__file__).resolve().parents[2]
POLL_SECONDS = 0.05
GRACE_SECONDS = 3.0
FAILURE_REPORT_SECONDS = 2.0
"""How long to wait for the first failing rank's message once a rank has exited with an error."""

UPSCALE_JOB = "ultrares.models.infdit.worker:upscale_job"

BOOTSTRAP = """\
import importlib.util, os, sys
root, target, job = sys.argv[1:4]
spec = importlib.util.spec_from_file_location("ultrares", os.path.join(root, "__init__.py"),
                                              submodule_search_locations=[root])
pack = importlib.util.module_from_spec(spec)
sys.modules["ultrares"] = pack
spec.loader.exec_module(pack)
from ultrares.models.infdit.worker import main
code = main(target, job)
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
"""


class RankFailed(NamedError, RuntimeError):
    """A rank of a distributed run failed; the message names it, its device and its error."""


def parse_devices(spec: str | Sequence[str | torch.device]) -> list[torch.device]:
    """``"cuda:0,cuda:1"``, ``"cpu,cpu"`` or a list -> devices. CUDA devices must be distinct
    (NCCL runs one rank per GPU); the CPU may be listed several times (gloo ranks)."""
    items = [part.strip() for part in spec.split(",")] if isinstance(spec, str) else list(spec)
    devices = []
    for item in items:
        if isinstance(item, str) and not item:
            raise ValueError(f"empty device in {spec!r}")
        try:
            device = torch.device(item)
        except RuntimeError as error:
            raise ValueError(f"{item!r} is not a device (expected e.g. cuda:0 or cpu)") from error
        devices.append(torch.device("cuda", 0) if device.type == "cuda" and device.index is None else device)
    if not devices:
        raise ValueError("no device given")
    kinds = {device.type for device in devices}
    if len(kinds) > 1 or kinds - {"cuda", "cpu"}:
        raise ValueError(f"the devices {spec!r} must be all CUDA GPUs or all the CPU")
    if "cuda" in kinds and len(set(devices)) < len(devices):
        raise ValueError(f"a GPU is listed twice in {spec!r}: each GPU runs one rank")
    return devices


def _rank_environment(device: torch.device, rank: int, ranks: int, port: int, threads: int | None) -> dict[str, str]:
    env = {"RANK": str(rank), "WORLD_SIZE": str(ranks), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(ranks),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    if device.type == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[device.index].strip() if visible else str(device.index)
        env[DEVICE_ENV] = "cuda:0"
    else:
        env[DEVICE_ENV] = "cpu"
        env[THREADS_ENV] = str(threads or max(1, (os.cpu_count() or 1) // ranks))
    return env


def _failure(control: dist.Store, processes: list[subprocess.Popen], devices: list[torch.device]) -> RankFailed:
    try:
        control.wait([failure_key(1)], timedelta(seconds=FAILURE_REPORT_SECONDS))
        return RankFailed(control.get(failure_key(1)).decode())
    except Exception:  # noqa: BLE001  (the failing rank wrote nothing: say how it ended)
        codes = [(rank, process.poll()) for rank, process in enumerate(processes)]
        rank, code = next((rank, code) for rank, code in codes if code not in (None, 0))
        return RankFailed(f"rank {rank} ({devices[rank]}) exited with status {code} without a message "
                          "(its output is above)")


def _stop(control: dist.Store, processes: list[subprocess.Popen]) -> None:
    """Set the stop flag, give the ranks a moment, kill what is left, and reap them all."""
    if any(process.poll() is None for process in processes):
        try:
            control.set(STOP_KEY, "1")
        except Exception:  # noqa: BLE001  (killing them below is enough)
            pass
        deadline = time.monotonic() + GRACE_SECONDS
        while time.monotonic() < deadline and any(process.poll() is None for process in processes):
            time.sleep(POLL_SECONDS)
    for process in processes:
        if process.poll() is None:
            process.kill()
    for process in processes:
        process.wait()


class _Watch:
    """What the host reads from the store while the ranks run: plan, progress, status, preview."""

    def __init__(self, control: dist.Store, ranks: int, total: int | None, on_progress, on_plan, on_status,
                 on_preview):
        self.control, self.ranks, self.total = control, ranks, total
        self.on_progress, self.on_plan, self.on_status, self.on_preview = on_progress, on_plan, on_status, on_preview
        self.planned, self.reported = False, -1
        self.previews = [0] * ranks
        self.mosaic = PreviewMosaic()

    def poll(self) -> None:
        control = self.control
        if not self.planned and control.check([PLAN_KEY]):
            plan, self.planned = json.loads(control.get(PLAN_KEY)), True
            for level, message in plan["messages"]:
                logging.log(level, "Inf-DiT: %s", message)
            self.total = plan["total"] if self.total is None else self.total
            if self.on_plan is not None:
                self.on_plan(plan.get("summary", ""))
        if self.total is not None:
            done = min(control.add(PROGRESS_KEY, 0), self.total)
            if done != self.reported:
                self.reported = done
                if self.on_status is not None:
                    self.on_status([control.get(status_key(rank)).decode() if control.check([status_key(rank)])
                                    else None for rank in range(self.ranks)])
                if self.on_progress is not None:
                    self.on_progress(done, self.total)
        if self.on_preview is not None:
            changed = False
            for rank in range(self.ranks):
                version = control.add(preview_key(rank) + " version", 0)
                if version != self.previews[rank]:
                    self.previews[rank], changed = version, True
                    self.mosaic.put(control.get(preview_key(rank)))
            if changed:
                self.on_preview(self.mosaic.image())


def run_ranks(target: str, job: dict[str, Any], devices: Sequence[str | torch.device], *,
              total: int | None = None, on_progress: Callable[[int, int], None] | None = None,
              check_interrupt: Callable[[], None] | None = None, timeout: float | None = None,
              threads: int | None = None, env: dict[str, str] | None = None,
              on_plan: Callable[[str], None] | None = None,
              on_status: Callable[[list[str | None]], None] | None = None,
              on_preview: Callable[[torch.Tensor], None] | None = None) -> Any:
    """Run ``target(group, **job)`` (``"module:function"``, importable in a rank once the pack is
    bound as ``ultrares``) on one process per device; return rank 0's result.

    ``on_progress(done, total)`` gets the block batches finished over all ranks (``total``: given,
    or the one rank 0 publishes with its plan, whose messages go to the log and whose summary
    goes to ``on_plan``); ``on_status`` gets every rank's last status line (None before its
    first) when the progress moves; ``on_preview`` the ranks' preview bands put together
    (``[h, w, 3]`` uint8) when one of them changed; ``check_interrupt`` may raise to stop the
    run (re-raised here once every rank is gone); ``timeout`` (seconds) raises
    :class:`TimeoutError` the same way; ``threads``: CPU threads per CPU rank (default: the
    cores shared out); ``env``: extra environment of the ranks.
    """
    devices = parse_devices(devices)
    folder = Path(tempfile.mkdtemp(prefix="ultrares-ranks-"))
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(minutes=30))
    control = dist.PrefixStore("control/", store)
    processes: list[subprocess.Popen] = []
    try:
        torch.save(job, folder / JOB_FILE)
        for rank, device in enumerate(devices):
            rank_env = {**os.environ, **(env or {}), **_rank_environment(device, rank, len(devices), store.port,
                                                                          threads)}
            processes.append(subprocess.Popen([sys.executable, "-c", BOOTSTRAP, str(PACK_ROOT), target, str(folder)],
                                              env=rank_env))
        started = time.monotonic()
        watch = _Watch(control, len(devices), total, on_progress, on_plan, on_status, on_preview)
        while True:
            codes = [process.poll() for process in processes]
            watch.poll()
            if any(code not in (None, 0) for code in codes):
                raise _failure(control, processes, devices)
            if all(code == 0 for code in codes):
                break
            if check_interrupt is not None:
                check_interrupt()
            if timeout is not None and time.monotonic() - started > timeout:
                raise TimeoutError(f"the ranks did not finish within {timeout:g} s")
            time.sleep(POLL_SECONDS)
        return torch.load(folder / RESULT_FILE, weights_only=True)
    finally:
        _stop(control, processes)
        del control, store
        shutil.rmtree(folder, ignore_errors=True)


def upscale_on_ranks(source: WeightSource, images: torch.Tensor, options: UpscaleOptions,
                     devices: Sequence[str | torch.device], **run_options: Any) -> torch.Tensor:
    """:func:`.upscale.upscale` shared by one local process per device, each loading the weights
    from ``source``; the ranks plan the request ``options`` with the memory their devices have
    free (:func:`.worker.plan_on_ranks`; the budget is per rank). ``run_options``: those of
    :func:`run_ranks` (progress, plan, status, preview, interruption, time limit, threads); the
    ranks paint previews only when ``on_preview`` is given."""
    job = upscale_job_arguments(source, images, options, preview=run_options.get("on_preview") is not None)
    return run_ranks(UPSCALE_JOB, job, devices, **run_options)
