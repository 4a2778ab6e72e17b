"""The memory model against measured peaks, the budget rule, planning with the memory a host
reports free, and the out-of-memory fallback."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch

from ultrares.benchmarks.meter import LiveTensorMeter
from ultrares.models.infdit.budget import UpscaleOptions, fit_budget, plan_budget, plan_stage, weight_bytes, working_memory
from ultrares.models.infdit.memory import GiB, BudgetTooSmall, choose_batch_size, estimate_memory, memory_text
from ultrares.models.infdit.network import InfDiT
from ultrares.models.infdit.schedule import plan_batches
from ultrares.models.infdit.tiny import TINY, tiny_weights
from ultrares.models.infdit.upscale import upscale

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def weights():
    return tiny_weights(seed=8)


def measured_peak(weights, lr_side: int, options: UpscaleOptions) -> int:
    """Peak device bytes of a whole 4x sample, weights included (they exist before the meter)."""
    image, meter = torch.rand(1, 3, lr_side, lr_side), LiveTensorMeter()
    with meter:
        upscale(weights, image, options, CPU, observer=meter)
    return meter.peak + weight_bytes(weights)


def test_the_meter_counts_allocations_once_and_not_host_work():
    meter = LiveTensorMeter()
    with meter:
        a = torch.zeros(1000)
        view = a[10:]
        b = a + 1
        assert meter.current == 8000
        with meter.host_work():
            host = torch.zeros(5000)
        host += 1
        assert meter.current == 8000
        del a, view, b
        assert meter.current == 0
    assert meter.peak == 8000 and host.sum() == 5000


@pytest.mark.parametrize("lr_side, n, offload", [(32, 1, False), (32, 3, False), (32, 8, False), (32, 1, True),
                                                 (48, 2, True)])
def test_the_memory_model_bounds_the_measured_peak_closely(weights, lr_side, n, offload):
    options = UpscaleOptions(scale=4, steps=1, batch_blocks=n, offload=offload)
    estimate = plan_stage(weights, 4 * lr_side, 4 * lr_side, options).total
    measured = measured_peak(weights, lr_side, options)
    assert measured <= estimate <= 1.1 * measured


def test_with_offloading_device_memory_does_not_grow_with_the_image(weights):
    options = UpscaleOptions(scale=4, steps=1, batch_blocks=2, offload=True)
    small, large = measured_peak(weights, 24, options), measured_peak(weights, 56, options)
    assert large == small
    assert measured_peak(weights, 56, UpscaleOptions(scale=4, steps=1, batch_blocks=2)) > 2 * small


def test_the_budget_picks_the_largest_batch_that_fits_and_the_sample_stays_under_it(weights):
    kwargs = dict(weight_bytes=weight_bytes(weights), dtype=torch.float32, offload=False)
    side = 8 * TINY.block_px
    estimates = {n: estimate_memory(TINY, side, side, n, **kwargs).total for n in range(1, 9)}
    budget = (estimates[3] + estimates[4]) / 2
    assert choose_batch_size(TINY, side, side, budget, **kwargs).n == 3
    assert choose_batch_size(TINY, side, side, estimates[2] * 1.2, margin=0.2, **kwargs).n == 2
    assert choose_batch_size(TINY, side, side, 1e12, **kwargs).n == 8
    options = UpscaleOptions(scale=4, steps=1, budget_bytes=budget)
    assert measured_peak(weights, side // 4, options) <= budget


def test_a_budget_below_one_block_per_batch_is_refused_with_the_breakdown_in_units_that_fit(weights):
    # The tiny model's terms are KiB and MiB: each reads in its own unit, never as "0.00 GiB".
    size = r"\d+(\.\d+)? (KiB|MiB)"
    with pytest.raises(BudgetTooSmall, match=rf"a memory budget of 1000 bytes is below the minimum for a 128x64 output "
                                             rf"\(weights {size} \+ sampler state {size} \+ neighbour cache {size} \+ "
                                             rf"batch activations {size} = {size} with one block per batch\).*offloading"):
        choose_batch_size(TINY, 64, 128, 1000, weight_bytes=weight_bytes(weights), dtype=torch.float32,
                          offload=False)


@pytest.mark.parametrize("size, text", [(0, "0 bytes"), (512, "512 bytes"), (12 * 2**10, "12.0 KiB"),
                                        (640 * 2**20, "640 MiB"), (99.96 * 2**20, "100 MiB"),
                                        (9.874 * GiB, "9.87 GiB"), (14.24 * GiB, "14.2 GiB"),
                                        (1500 * GiB, "1500 GiB")])
def test_memory_reads_in_the_unit_that_fits_with_about_three_digits(size, text):
    assert memory_text(size) == text


def test_a_budget_that_fits_only_with_offloading_switches_it_on(weights):
    size = (32, 40)
    floor = {offload: plan_stage(weights, 128, 160, UpscaleOptions(batch_blocks=1, offload=offload)).total
             for offload in (False, True)}
    assert floor[True] < floor[False]
    between = UpscaleOptions(budget_bytes=(floor[True] + floor[False]) / 2)
    assert fit_budget(weights, size, between) == replace(between, offload=True)
    roomy = UpscaleOptions(budget_bytes=floor[False] * 1.5)
    assert fit_budget(weights, size, roomy) is roomy
    with pytest.raises(BudgetTooSmall, match=r"below the minimum for a 160x128 output \(weights .*\)$"):
        fit_budget(weights, size, UpscaleOptions(budget_bytes=floor[True] * 0.9))


SIZE = (12, 20)
"""An input whose 4x output is 48 x 80 pixels: 3 x 5 blocks."""


def floor(weights, n: int = 1) -> dict[bool, int]:
    """Device bytes of n x n batches for :data:`SIZE`, on the device and offloaded."""
    return {offload: plan_stage(weights, 48, 80, UpscaleOptions(batch_blocks=n, offload=offload)).total
            for offload in (False, True)}


def test_a_plan_uses_what_is_free_and_lowers_a_budget_above_it_saying_so(weights):
    available = 10 * GiB + weight_bytes(weights)
    plan = plan_budget(weights, SIZE, UpscaleOptions(), free_bytes=10 * GiB)
    assert plan.options.budget_bytes == available and plan.stages[-1].n == 5
    assert [(level, text.split(":")[0]) for level, text in plan.messages] == [(logging.INFO, "5 x 5 blocks per batch")]
    lowered = plan_budget(weights, SIZE, UpscaleOptions(budget_bytes=2 * available), free_bytes=10 * GiB)
    assert lowered.options.budget_bytes == available
    level, text = lowered.messages[0]
    assert level == logging.WARNING and "is more than the 10.0 GiB available with the model loaded" in text


def test_a_budget_that_fits_only_offloaded_switches_it_on_saying_so(weights):
    between = sum(floor(weights).values()) / 2
    plan = plan_budget(weights, SIZE, UpscaleOptions(budget_bytes=between), free_bytes=GiB)
    assert plan.options == UpscaleOptions(budget_bytes=between, offload=True)
    assert "keeping them in CPU RAM instead (same result, slower)" in plan.messages[0][1]
    assert plan.messages[1][1].startswith("1 x 1 blocks per batch: weights")


def test_a_plan_says_when_offloading_would_double_the_batch_and_when_it_needs_more_ram_than_is_free(weights):
    two = floor(weights, 2)
    plan = plan_budget(weights, SIZE, UpscaleOptions(budget_bytes=two[True]), free_bytes=GiB)
    assert not plan.options.offload and plan.stages[-1].n == 1
    assert plan.messages[-1] == (logging.INFO, "with offloading on, the same budget allows 2 x 2 blocks per batch "
                                               "(fewer, larger batches; uses CPU RAM)")
    offloaded = UpscaleOptions(budget_bytes=two[True], offload=True)
    roomy = plan_budget(weights, SIZE, offloaded, free_bytes=GiB, host_free_bytes=GiB)
    assert [level for level, _ in roomy.messages] == [logging.INFO]
    level, text = plan_budget(weights, SIZE, offloaded, free_bytes=GiB, host_free_bytes=1000).messages[-1]
    assert level == logging.WARNING and "of CPU RAM for a 80x48 output, 1000 bytes is free" in text


def test_the_plan_reads_as_a_few_lines_saying_what_it_chose_and_why(weights):
    two = floor(weights, 2)
    plan = plan_budget(weights, SIZE, UpscaleOptions(budget_bytes=two[False] * 1.01), free_bytes=GiB)
    assert plan.stages[-1].n == 2 and plan.batches == (len(plan_batches(3, 5, 2)),) == (6,)
    assert plan.describe(SIZE).split("\n") == [
        "4× upscale → 80×48",
        "2×2 blocks per batch, 6 batches × 39 evaluations",
        f"GPU memory: about {memory_text(plan.stages[-1].total)} of {memory_text(two[False] * 1.01)} "
        "(the VRAM budget you set)"]
    free = plan_budget(weights, SIZE, UpscaleOptions(scale=8, steps=2), free_bytes=GiB)
    lines = free.describe(SIZE, images=2).split("\n")
    assert lines[0] == "8× upscale → 160×96, 2 images"
    assert lines[1].startswith("pass 1: ") and lines[2].startswith("pass 2: ") and lines[2].endswith("× 3 evaluations")
    assert lines[3].endswith("(all that is free once the model is loaded)")
    squeezed = plan_budget(weights, SIZE, UpscaleOptions(budget_bytes=sum(floor(weights).values()) / 2),
                           free_bytes=GiB, host_free_bytes=GiB)
    assert squeezed.describe(SIZE).split("\n")[-1] == (
        f"offloaded to CPU RAM: about {memory_text(squeezed.host_bytes)} (needed to fit the budget; "
        "same result, slower)")


def test_before_loading_the_plan_asks_for_what_the_budget_needs_or_the_least_that_works(weights):
    floors = floor(weights)
    assert working_memory(weights, SIZE, UpscaleOptions()) == floors[True] - weight_bytes(weights)
    budget = UpscaleOptions(budget_bytes=1.5 * floors[False])
    assert working_memory(weights, SIZE, budget) == plan_stage(weights, 48, 80, budget).total - weight_bytes(weights)
    with pytest.raises(BudgetTooSmall):
        working_memory(weights, SIZE, UpscaleOptions(budget_bytes=0.9 * floors[True]))


class RunsOutOfMemoryAbove(InfDiT):
    """Raises the device's out-of-memory error for batches of more than ``limit`` blocks."""

    limit = 4

    def embed(self, x):
        blocks = (x.shape[-2] // self.cfg.block_px) * (x.shape[-1] // self.cfg.block_px)
        if blocks > self.limit:
            raise torch.OutOfMemoryError("simulated: batch too large")
        return super().embed(x)


def upscale_with(weights, net_class, images, n):
    """Upscale with the same weights in a failing network; returns the result, the progress
    reports and the result of the normal network without a batch size."""
    failing = tiny_weights(seed=8)
    failing.net = net_class(TINY)
    failing.net.load_state_dict(weights.net.state_dict())
    reports = []
    out = upscale(failing, images, UpscaleOptions(scale=4, steps=2, batch_blocks=n), CPU,
                  on_progress=lambda done, total: reports.append((done, total)))
    return out, reports, upscale(weights, images, UpscaleOptions(scale=4, steps=2), CPU), failing


def test_running_out_of_memory_retries_with_smaller_batches_and_the_same_result(weights):
    images = torch.rand(2, 3, 20, 24)
    out, reports, reference, failing = upscale_with(weights, RunsOutOfMemoryAbove, images, 4)
    assert (out - reference).abs().max() <= 1e-5
    done, total = reports[-1]
    # 2 images x 3 evaluations of a 5x6-block image in 2x2 batches: the second image starts at n = 2.
    assert done == total == 2 * 3 * 9
    assert reports[0] == (1, total)  # n = 4 and n = 3 failed before their first batch
    failing.net.limit = 0
    with pytest.raises(torch.OutOfMemoryError, match="even with one block per batch"):
        upscale(failing, images, UpscaleOptions(scale=4, steps=1, batch_blocks=2), CPU)


class RunsOutOfMemoryOnTheThirdBatch(InfDiT):
    calls = 0

    def embed(self, x):
        self.calls += 1
        if self.calls == 3:
            raise torch.OutOfMemoryError("simulated: fragmentation")
        return super().embed(x)


def test_an_evaluation_that_fails_midway_is_redone_and_progress_rewinds(weights):
    out, reports, reference, _ = upscale_with(weights, RunsOutOfMemoryOnTheThirdBatch, torch.rand(1, 3, 20, 24), 3)
    assert (out - reference).abs().max() <= 1e-5
    # n = 3 (2x2 batches): two batches done, then n = 2 (3x3 batches) from the start.
    assert reports[:3] == [(1, 12), (2, 12), (1, 27)]
    assert reports[-1] == (27, 27)
