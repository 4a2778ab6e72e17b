"""The block schedule: the order of the batches, what each depends on, and the one cache
policy, which the cache carries out and the memory model counts."""

from __future__ import annotations

import pytest
import torch

from ultrares.models.infdit.evaluate import NeighbourCache
from ultrares.models.infdit.schedule import (BlockBatch, Placement, Schedule, plan_batches, plan_ranks, plan_schedule,
                                            resolve_scan)

CPU = torch.device("cpu")
LAYERS = 3


def test_auto_scan_keeps_the_cached_strip_on_the_shorter_side():
    assert resolve_scan(5, 7, "auto") == "column"
    assert resolve_scan(7, 5, "auto") == "row"
    assert [b.rows.start for b in plan_batches(4, 6, 2, "column")[:2]] == [0, 2]
    assert [b.cols.start for b in plan_batches(4, 6, 2, "row")[:2]] == [0, 2]
    assert plan_batches(5, 7, 3, "row")[-1] == BlockBatch(range(3, 5), range(6, 7))


def test_an_order_that_reads_blocks_before_they_exist_is_refused():
    with pytest.raises(ValueError, match="not a valid UniBA order"):
        plan_schedule(list(reversed(plan_batches(5, 7, 2, "row"))))


def test_a_batch_depends_on_the_batches_that_own_its_left_top_and_top_left_neighbours():
    # 4 x 6 blocks in 2 x 2 batches; row-major: (0,0) (0,2) (0,4) (2,0) (2,2) (2,4).
    assert plan_schedule(plan_batches(4, 6, 2, "row")).depends_on == ((), (0,), (1,), (0,), (0, 1, 3), (1, 2, 4))
    # Column-major: (0,0) (2,0) (0,2) (2,2) (0,4) (2,4).
    assert plan_schedule(plan_batches(4, 6, 2, "column")).depends_on == ((), (0,), (0,), (0, 1, 2), (2,), (2, 3, 4))


@pytest.mark.parametrize("grid, n, scan", [((4, 9), 2, "row"), ((5, 7), 3, "column"), ((6, 6), 4, "row"),
                                           ((7, 5), 1, "auto")])
@pytest.mark.parametrize("offload", [False, True])
def test_every_block_is_cached_from_its_batch_until_its_last_reader_and_offloading_keeps_the_next_reads(
        grid, n, scan, offload):
    schedule = plan_schedule(plan_batches(*grid, n, scan), offload)
    device, host, dropped = set(), set(), set()
    for index, (batch, steps) in enumerate(zip(schedule.batches, schedule.steps)):
        assert set(steps.read) <= device | host
        assert not set(steps.read) & set(batch.blocks)
        later_reads = {block for later in schedule.steps[index + 1:] for block in later.read}
        assert not set(steps.drop) & later_reads and set(steps.drop) <= set(steps.read)
        device -= set(steps.drop)
        host -= set(steps.drop)
        dropped |= set(steps.drop)
        assert set(steps.offload) <= device
        device -= set(steps.offload)
        host |= set(steps.offload)
        assert set(steps.store) | set(steps.store_on_host) == set(batch.blocks) & later_reads
        device |= set(steps.store)
        host |= set(steps.store_on_host)
        assert (len(device), len(host)) == (steps.device_blocks, steps.host_blocks)
        if offload and index + 1 < len(schedule.steps):
            assert device <= set(schedule.steps[index + 1].read)
        if not offload:
            assert not host
    assert not device and not host
    assert dropped == {block for steps in schedule.steps for block in steps.read}


class ObservedPlacement(Placement):
    """Calls ``observe`` before every copy to the host, i.e. also in the middle of the steps."""

    observe = staticmethod(lambda: None)

    def to_host(self, t):
        self.observe()
        return super().to_host(t)


def replay_cache(schedule: Schedule, block_kv: torch.Tensor) -> tuple[int, int]:
    """Run the cache through a whole evaluation of ``schedule``; its peak device and host
    entries (summed over layers), checking after every batch that it holds what the schedule says."""
    placement = ObservedPlacement(CPU, schedule.offload)
    cache = NeighbourCache(LAYERS, placement)
    peaks = [0, 0]

    def observe():
        peaks[0] = max(peaks[0], cache.device_entries())
        peaks[1] = max(peaks[1], cache.host_entries())

    placement.observe = observe
    for batch, steps in zip(schedule.batches, schedule.steps):
        kb = block_kv.expand(1, len(batch.rows), len(batch.cols), *block_kv.shape[3:])
        gather = cache.neighbours(batch, steps)
        for layer in range(LAYERS):
            gather(layer, kb, kb)
            observe()
        assert (cache.device_entries(), cache.host_entries()) == (steps.device_blocks * LAYERS,
                                                                  steps.host_blocks * LAYERS)
    assert cache.device_entries() == cache.host_entries() == 0
    return peaks[0], peaks[1]


def test_offloading_keeps_only_the_next_batchs_neighbours_on_the_device():
    block_kv = torch.randn(1, 1, 1, 4, 2, 3)
    # Row-major: the right column of the batch just done stays on the device for the next
    # one; the strip of bottom rows waits on the host, whatever the width.
    for width in (9, 30):
        peak_device, peak_host = replay_cache(plan_schedule(plan_batches(4, width, 2, "row"), True), block_kv)
        assert peak_device == 2 * LAYERS
        assert peak_host >= (width - 1) * LAYERS
    # Without offloading the whole strip stays on the device.
    assert replay_cache(plan_schedule(plan_batches(4, 30, 2, "row")), block_kv)[0] >= 30 * LAYERS


@pytest.mark.parametrize("grid, n, scan", [((4, 9), 2, "row"), ((5, 7), 3, "column"), ((6, 6), 4, "row"),
                                           ((7, 5), 1, "auto")])
@pytest.mark.parametrize("offload", [False, True])
def test_the_cache_never_holds_more_than_the_memory_model_counts(grid, n, scan, offload):
    schedule = plan_schedule(plan_batches(*grid, n, scan), offload)
    peak_device, peak_host = replay_cache(schedule, torch.randn(1, 1, 1, 4, 2, 3))
    assert schedule.device_peak * LAYERS == peak_device
    assert (schedule.host_peak * LAYERS if offload else 0) == peak_host


class FakeExchange:
    """Hands a rank's cache the blocks its schedule receives, and notes what it sends."""

    def __init__(self, schedule: Schedule, block_kv: torch.Tensor, observe):
        self.schedule, self.block_kv, self.observe, self.sent = schedule, block_kv, observe, []

    def begin(self, position):
        pass

    def arrivals(self, position, layer):
        for transfer in self.schedule.steps[position].receive:
            # Views into one message per transfer, as the real exchange hands them out.
            message = self.block_kv[0, 0, 0].expand(2, len(transfer.blocks), *self.block_kv.shape[3:]).clone()
            for index, block in enumerate(transfer.blocks):
                yield block, message[0, index], message[1, index]
        self.observe()

    def send(self, position, layer, k, v):
        self.sent += [(layer, block) for t in self.schedule.steps[position].send for block in t.blocks]


@pytest.mark.parametrize("grid, n, scan, ranks", [((5, 7), 1, "row", 3), ((6, 5), 2, "column", 2), ((7, 4), 3, "auto", 3)])
@pytest.mark.parametrize("offload", [False, True])
def test_a_ranks_cache_holds_what_its_steps_say_and_its_received_blocks_count_in_the_peak(grid, n, scan, ranks,
                                                                                           offload):
    block_kv = torch.randn(1, 1, 1, 4, 2, 3)
    for layers in (1, LAYERS):
        for schedule in plan_ranks(*grid, n, scan, offload, ranks):
            placement = ObservedPlacement(CPU, offload)
            cache = NeighbourCache(layers, placement)
            peak = [0]

            def observe():
                peak[0] = max(peak[0], cache.device_entries())

            placement.observe = observe
            exchange = FakeExchange(schedule, block_kv, observe)
            for position, (batch, steps) in enumerate(zip(schedule.batches, schedule.steps)):
                kb = block_kv.expand(1, len(batch.rows), len(batch.cols), *block_kv.shape[3:])
                gather = cache.neighbours(batch, steps, position, exchange)
                for layer in range(layers):
                    gather(layer, kb, kb)
                    observe()
                assert (cache.device_entries(), cache.host_entries()) == (steps.device_blocks * layers,
                                                                          steps.host_blocks * layers)
                # A block kept for later batches owns its memory: it never pins a whole message.
                assert all(t.untyped_storage().nbytes() == t.nbytes for entries in cache._entries
                           for k, v, _ in entries.values() for t in (k, v))
            assert cache.device_entries() == cache.host_entries() == 0
            assert len(exchange.sent) == schedule.sent_blocks * layers
            # Received blocks' buffers exist for all layers from the batch's start: the plan's
            # count is an upper bound, reached with one layer.
            assert peak[0] <= schedule.cache_peak * layers
            if layers == 1:
                assert peak[0] == schedule.cache_peak
