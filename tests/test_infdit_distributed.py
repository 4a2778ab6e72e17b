"""Inf-DiT shared by several ranks (processes on torch.distributed, gloo on the CPU) equals one
device, and a run stops cleanly on any rank's failure or on cancel.

The planning tests need no processes. The others start 2 and 3 real ranks with the pack's
launcher (one thread each, the tiny model, a time limit): one evaluation and whole samples
are bit-identical to the single-process computation (the arithmetic of every batch is the
same; only where its neighbours' keys come from differs), with ragged edge batches, both
scan orders and offloading on and off.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

import infdit_rank_checks as checks
from ultrares.models.infdit._full_reference import reference_evaluation
from ultrares.models.infdit.budget import UpscaleOptions
from ultrares.models.infdit.checkpoint import WeightSource
from ultrares.models.infdit.memory import block_bytes
from ultrares.models.infdit.pipeline import model_pipeline
from ultrares.models.infdit.sampler import initial_state
from ultrares.models.infdit.schedule import assign_stripes, plan_batches, plan_ranks, resolve_scan
from ultrares.models.infdit.shard import ImageShard
from ultrares.models.infdit.launch import GRACE_SECONDS, RankFailed, run_ranks, upscale_on_ranks
from ultrares.models.infdit.progress import PreviewCanvas
from ultrares.models.infdit.tiny import TINY
from ultrares.models.infdit.upscale import upscale
from ultrares.models.infdit.worker import upscale_job_arguments

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

CPU = torch.device("cpu")
TESTS = Path(__file__).resolve().parent
RANK_ENV = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
TIME_LIMIT = 120.0

EVALUATIONS = [dict(grid=(5, 7), n=1, scan="row", offload=False),    # lines of 7 batches: > 2 per rank
               dict(grid=(5, 7), n=2, scan="column", offload=True),  # ragged, column-major
               dict(grid=(7, 4), n=3, scan="auto", offload=False),   # ragged, one line per rank with 3
               dict(grid=(4, 3), n=2, scan="column", offload=True)]  # two lines: with 3 ranks one is idle
IMAGE = torch.rand(1, 3, 20, 28, generator=torch.Generator().manual_seed(3))
SAMPLES = [UpscaleOptions(scale=4, steps=2, seed=11, batch_blocks=2, scan="row", offload=True),
           UpscaleOptions(scale=8, steps=1, seed=5, batch_blocks=1, scan="column")]
SOURCE = WeightSource(tiny_seed=6)


# --- Planning -----------------------------------------------------------------------------------

@pytest.mark.parametrize("grid, n, scan, ranks", [((5, 7), 1, "row", 3), ((5, 7), 2, "column", 2), ((9, 4), 2, "row", 4),
                                                  ((3, 3), 1, "auto", 5)])
def test_ranks_get_contiguous_stripes_and_keys_only_travel_to_the_next_rank_once_in_read_order(grid, n, scan, ranks):
    schedules = plan_ranks(*grid, n, scan, False, ranks)
    everything = sorted(batch for schedule in schedules for batch in schedule.positions)
    assert everything == list(range(len(plan_batches(*grid, n, scan))))
    shards = [ImageShard.of(schedule, TINY.block_px) for schedule in schedules]
    covered = [block for shard in shards for block in shard.band]
    assert covered == list(range(grid[0] if resolve_scan(*grid, scan) == "row" else grid[1]))
    for schedule in schedules:
        mine = {block for batch in schedule.batches for block in batch.blocks}
        received = [block for steps in schedule.steps for t in steps.receive for block in t.blocks]
        assert len(received) == len(set(received)) and not set(received) & mine
        assert all(t.peer == schedule.rank - 1 for steps in schedule.steps for t in steps.receive)
        assert all(t.peer == schedule.rank + 1 for steps in schedule.steps for t in steps.send)
        seen = set(mine)
        for batch, steps in zip(schedule.batches, schedule.steps):
            seen |= {block for t in steps.receive for block in t.blocks}
            assert set(steps.read) <= seen  # arrived before it is read
        remote_reads = {block for steps in schedule.steps for block in steps.read} - mine
        assert remote_reads == set(received)


def test_the_larger_stripes_go_last_and_extra_ranks_idle_first():
    batches = plan_batches(5, 3, 1, "row")
    assert assign_stripes(batches, "row", 2) == (0,) * 6 + (1,) * 9
    assert assign_stripes(plan_batches(2, 2, 1, "row"), "row", 3) == (1, 1, 2, 2)


def _replay_timeline(grid, n, scan, ranks, evaluations):
    """The same timeline from the schedules' dependency edges, batch by batch."""
    schedules = plan_ranks(*grid, n, scan, False, ranks)
    batches = plan_batches(*grid, n, resolve_scan(*grid, scan))
    owner = {position: s.rank for s in schedules for position in s.positions}
    deps = {position: d for s in schedules for position, d in zip(s.positions, s.depends_on)}
    free, finish = [0.0] * ranks, [0.0] * len(batches)
    for _ in range(evaluations):
        for index, batch in enumerate(batches):
            start = max([free[owner[index]]] + [finish[d] for d in deps[index]])
            finish[index] = free[owner[index]] = start + len(batch.rows) * len(batch.cols)
    return max(free)


@pytest.mark.parametrize("grid, n, scan, ranks", [((6, 9), 2, "row", 3), ((9, 6), 2, "column", 2), ((7, 7), 1, "auto", 4)])
def test_the_pipeline_model_is_the_batch_dag_scheduled_without_a_barrier_between_evaluations(grid, n, scan, ranks):
    model = model_pipeline(*grid, n, scan, ranks, evaluations=5)
    assert model.makespan == _replay_timeline(grid, n, scan, ranks, 5)
    assert model.work == 5 * grid[0] * grid[1] and 0 < model.fill <= 1
    # The next evaluation overlaps this one's tail: faster than sweeps one after another.
    assert model.makespan < 5 * model_pipeline(*grid, n, scan, ranks, evaluations=1).makespan


def test_a_rank_draws_exactly_the_noise_one_device_draws_for_its_pixels():
    lr = torch.rand(1, 3, 4 * TINY.block_px, 3 * TINY.block_px, generator=torch.Generator().manual_seed(1))
    whole = initial_state(lr, torch.Generator().manual_seed(7), True, torch.empty_like(lr))
    for scan in ("row", "column"):
        for schedule in plan_ranks(4, 3, 1, scan, False, 3):
            shard = ImageShard.of(schedule, TINY.block_px)
            local = initial_state(shard.take(lr).contiguous(), torch.Generator().manual_seed(7), True,
                                  torch.empty(shard.shape(tuple(lr.shape))), shard=shard)
            assert torch.equal(local, shard.take(whole))


# --- Ranks ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks"])
def on_ranks(request, one_cpu_thread):
    """The checks run once on that many ranks: every evaluation case and every sample."""
    job = {"evaluations": EVALUATIONS,
           "samples": [upscale_job_arguments(SOURCE, IMAGE, options) for options in SAMPLES]}
    started = time.monotonic()
    result = run_ranks("infdit_rank_checks:checks", job, ["cpu"] * request.param, threads=1, timeout=TIME_LIMIT,
                       env=RANK_ENV)
    return request.param, result, time.monotonic() - started


@pytest.mark.parametrize("case", range(len(EVALUATIONS)), ids=[f"{c['grid']} n={c['n']} {c['scan']}"
                                                                + (" offloaded" if c["offload"] else "")
                                                                for c in EVALUATIONS])
def test_one_evaluation_on_ranks_is_bit_identical_to_one_device_and_equals_the_whole_image(on_ranks, case):
    _, result, _ = on_ranks
    spec = EVALUATIONS[case]
    single = checks.one_evaluation(None, **spec)
    assert torch.equal(result["evaluations"][case], single)
    net, x, concat_lr, lr_image, vector = checks.evaluation_inputs(spec["grid"])
    with torch.inference_mode():
        whole = reference_evaluation(net, x, checks.SIGMA, concat_lr, lr_image, vector)
    assert (result["evaluations"][case] - whole).abs().max() <= 1e-5


@pytest.mark.parametrize("case", range(len(SAMPLES)), ids=["4x offloaded", "8x column"])
def test_a_whole_sample_on_ranks_is_bit_identical_to_one_device(on_ranks, case):
    _, result, _ = on_ranks
    single = upscale(SOURCE.load(), IMAGE, SAMPLES[case], CPU)
    assert torch.equal(result["samples"][case], single)


def test_each_rank_sends_exactly_the_boundary_keys_the_plan_lists(on_ranks):
    ranks, result, _ = on_ranks
    layers_block = block_bytes(TINY, torch.float32)
    expected = [sum(plan_ranks(*case["grid"], case["n"], case["scan"], case["offload"], ranks)[rank].sent_blocks
                    for case in EVALUATIONS) * layers_block for rank in range(ranks)]
    assert [sent[0] for sent in result["bytes_sent"]] == expected
    assert result["bytes_sent"][-1] == [0, 0]  # the last stripe sends nothing


def test_the_host_hears_the_plan_where_each_rank_is_and_sees_the_ranks_preview(one_cpu_thread):
    options = UpscaleOptions(scale=4, steps=1, seed=2, batch_blocks=1, scan="row")
    plans, statuses, previews, progress = [], [], [], []
    out = upscale_on_ranks(SOURCE, IMAGE, options, ["cpu"] * 2, threads=1, timeout=TIME_LIMIT,
                           on_plan=plans.append, on_status=statuses.append,
                           on_preview=lambda image: previews.append(image.clone()),
                           on_progress=lambda done, total: progress.append((done, total)))
    (summary,) = plans
    assert summary.split("\n")[0] == "4× upscale → 112×80, shared by 2 devices"
    assert progress[-1] == (35, 35) and len(statuses) == len(progress)
    # Each rank's line says where it is in its own stripe of the 5 block rows of 7: rank 0 has 2 rows,
    # rank 1 (the larger stripes go last) the other 3.
    assert statuses[-1] == ["evaluation 1/1 · batch 14/14", "evaluation 1/1 · batch 21/21"]
    # The bands put together are the picture one device paints.
    canvas = PreviewCanvas(TINY.block_px)
    single = upscale(SOURCE.load(), IMAGE, options, CPU, preview=canvas)
    assert torch.equal(out, single) and torch.equal(previews[-1], canvas.image())


def _pids(folder: Path) -> list[int]:
    return [int(path.read_text()) for path in sorted(folder.glob("*.pid"))]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_rank_that_raises_stops_every_rank_and_its_error_is_reported(tmp_path):
    options = UpscaleOptions(scale=4, steps=3, seed=1, batch_blocks=1)
    job = dict(upscale_job_arguments(SOURCE, IMAGE, options), pid_folder=str(tmp_path), fail_rank=1, fail_after=4)
    started = time.monotonic()
    with pytest.raises(RankFailed, match=r"rank 1 \(cpu\): RuntimeError: injected failure after 4 batches"):
        run_ranks("infdit_rank_checks:upscale_noting_pids", job, ["cpu"] * 3, threads=1, timeout=TIME_LIMIT,
                  env=RANK_ENV)
    assert time.monotonic() - started < TIME_LIMIT / 2
    pids = _pids(tmp_path)
    assert len(pids) == 3 and not any(_alive(pid) for pid in pids)


class Cancelled(Exception):
    pass


def test_cancelling_mid_sweep_stops_every_rank_promptly(tmp_path):
    options = UpscaleOptions(scale=4, steps=20, seed=1, batch_blocks=1)
    total = 35 * 39  # far more than gets done
    reports, cancelled_at = [], []

    def check_interrupt():
        if reports and reports[-1] >= 10:
            cancelled_at.append(time.monotonic())
            raise Cancelled

    job = dict(upscale_job_arguments(SOURCE, IMAGE, options), pid_folder=str(tmp_path))
    with pytest.raises(Cancelled):
        run_ranks("infdit_rank_checks:upscale_noting_pids", job, ["cpu"] * 2, total=total,
                  on_progress=lambda done, _: reports.append(done), check_interrupt=check_interrupt, threads=1,
                  timeout=TIME_LIMIT, env=RANK_ENV)
    # The ranks saw the stop flag and left by themselves, well before they would have been killed.
    assert time.monotonic() - cancelled_at[0] < GRACE_SECONDS / 2
    pids = _pids(tmp_path)
    assert len(pids) == 2 and not any(_alive(pid) for pid in pids)
    assert 10 <= reports[-1] < total
