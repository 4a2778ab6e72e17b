"""Block-scheduled evaluation is exactly the whole-image UniBA computation.

The reference is :mod:`infdit_full_mode`, written from the released "full" inference:
positions from the token index, the clamp-and-concatenate neighbour gather of
``get_cat_layer_left_top`` and the LR windows of ``nn.Unfold`` after ``proj_lr``. The
scheduler must match it for any batch size, ragged edge batches, either scan order and
either cache placement.
"""

from __future__ import annotations

import pytest
import torch

from ultrares.models.infdit.evaluate import ImageContext, LRContext, NeighbourCache, evaluate
from ultrares.models.infdit.schedule import BlockBatch, CacheSchedule, Placement, plan_batches, resolve_scan
from ultrares.models.infdit.tiny import tiny_weights
from infdit_full_mode import reference_evaluation

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

CPU = torch.device("cpu")
GRID = (5, 7)


def make_case(grid: tuple[int, int]):
    weights = tiny_weights(seed=3)
    cfg = weights.net.cfg
    g = torch.Generator().manual_seed(0)
    height, width = grid[0] * cfg.block_px, grid[1] * cfg.block_px
    lr_image = torch.rand(1, 3, height // cfg.lr_scale, width // cfg.lr_scale, generator=g) * 2 - 1
    concat_lr = torch.nn.functional.interpolate(lr_image, size=(height, width), mode="bicubic").clamp(-1, 1)
    x = concat_lr + 2.5 * torch.randn(concat_lr.shape, generator=g)
    vector = torch.randn(1, cfg.vector_dim, generator=g)
    with torch.inference_mode():
        full = reference_evaluation(weights.net, x, 2.5, concat_lr, lr_image, vector)
    return weights.net, x, concat_lr, lr_image, vector, full


@pytest.fixture(scope="module")
def case(one_cpu_thread):
    return make_case(GRID)


def scheduled(net, x, concat_lr, lr_image, vector, batches, offload=False, sigma=2.5) -> torch.Tensor:
    placement = Placement(CPU, offload)
    with torch.inference_mode():
        context = ImageContext(placement.to_store(concat_lr), LRContext(net, lr_image, placement), vector)
        return evaluate(net, x, sigma, context, batches, placement, torch.empty_like(x))


def test_one_batch_over_the_whole_image_is_the_released_full_mode(case):
    net, x, concat_lr, lr_image, vector, full = case
    out = scheduled(net, x, concat_lr, lr_image, vector, [BlockBatch(range(GRID[0]), range(GRID[1]))])
    torch.testing.assert_close(out, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n, scan, offload", [
    (1, "row", False), (2, "row", False), (3, "row", True), (2, "column", True), (3, "column", False), (4, "auto", True),
])
def test_block_batches_equal_the_full_evaluation(case, n, scan, offload):
    net, x, concat_lr, lr_image, vector, full = case
    out = scheduled(net, x, concat_lr, lr_image, vector, plan_batches(*GRID, n, scan), offload)
    assert (out - full).abs().max() <= 1e-5


def test_rope_positions_wrap_identically_beyond_the_period():
    # 18 blocks of 4 tokens: 72 token columns, past the tiny model's 64-token RoPE period.
    net, x, concat_lr, lr_image, vector, full = make_case((2, 18))
    assert 18 * net.cfg.block > net.cfg.rope_period
    out = scheduled(net, x, concat_lr, lr_image, vector, plan_batches(2, 18, 3, "auto"), offload=True)
    assert (out - full).abs().max() <= 1e-5


def test_rectangular_batches_in_any_topological_order_are_exact(case):
    net, x, concat_lr, lr_image, vector, full = case
    batches = [BlockBatch(range(0, 2), range(0, 7)), BlockBatch(range(2, 5), range(0, 3)),
               BlockBatch(range(2, 3), range(3, 7)), BlockBatch(range(3, 5), range(3, 7))]
    out = scheduled(net, x, concat_lr, lr_image, vector, batches)
    assert (out - full).abs().max() <= 1e-5


def test_an_order_that_reads_blocks_before_they_exist_is_refused():
    with pytest.raises(ValueError, match="not a valid UniBA order"):
        CacheSchedule(list(reversed(plan_batches(*GRID, 2, "row"))))


def test_auto_scan_keeps_the_cached_strip_on_the_shorter_side():
    assert resolve_scan(5, 7, "auto") == "column"
    assert resolve_scan(7, 5, "auto") == "row"
    assert [b.rows.start for b in plan_batches(4, 6, 2, "column")[:2]] == [0, 2]
    assert [b.cols.start for b in plan_batches(4, 6, 2, "row")[:2]] == [0, 2]
    assert plan_batches(5, 7, 3, "row")[-1] == BlockBatch(range(3, 5), range(6, 7))


def test_perturbing_a_block_changes_only_blocks_below_and_right_within_one_block_per_layer(case):
    net, x, concat_lr, lr_image, vector, full = case
    block_px, (i, j) = net.cfg.block_px, (1, 2)
    x2 = x.clone()
    x2[..., i * block_px:(i + 1) * block_px, j * block_px:(j + 1) * block_px] += 0.5
    with torch.inference_mode():
        out = reference_evaluation(net, x2, 2.5, concat_lr, lr_image, vector)
    changed = (out != full).unflatten(2, (GRID[0], block_px)).unflatten(4, (GRID[1], block_px)).any(dim=(0, 1, 3, 5))
    reach = net.cfg.layers
    expected = torch.zeros(GRID, dtype=torch.bool)
    expected[i:i + reach + 1, j:j + reach + 1] = True
    assert torch.equal(changed, expected)


class ObservedPlacement(Placement):
    """Calls ``observe`` before every copy to the host, i.e. also in the middle of an update."""

    observe = staticmethod(lambda: None)

    def to_host(self, t):
        self.observe()
        return super().to_host(t)


def replay_cache(schedule: CacheSchedule, layers: int, offload: bool, block_kv: torch.Tensor):
    """Run the cache through a whole evaluation; peak device and host entries (summed over layers)."""
    placement = ObservedPlacement(CPU, offload)
    cache = NeighbourCache(schedule, layers, placement)
    peaks = [0, 0]

    def observe():
        peaks[0] = max(peaks[0], cache.device_entries())
        peaks[1] = max(peaks[1], cache.host_entries())

    placement.observe = observe
    for index, batch in enumerate(schedule.batches):
        kb = block_kv.expand(1, len(batch.rows), len(batch.cols), *block_kv.shape[3:])
        gather = cache.neighbours(index)
        for layer in range(layers):
            gather(layer, kb, kb)
            observe()
    assert cache.device_entries() == cache.host_entries() == 0
    return tuple(peaks)


def test_offloading_keeps_only_the_next_batchs_neighbours_on_the_device(case):
    layers = case[0].cfg.layers
    block_kv = torch.randn(1, 1, 1, 4, 2, 3)
    # Row-major: the right column of the batch just done stays on the device for the next
    # one; the strip of bottom rows waits on the host, whatever the width.
    for width in (9, 30):
        peak_device, peak_host = replay_cache(CacheSchedule(plan_batches(4, width, 2, "row")), layers, True, block_kv)
        assert peak_device == 2 * layers
        assert peak_host >= (width - 1) * layers
    # Without offloading the whole strip stays on the device.
    assert replay_cache(CacheSchedule(plan_batches(4, 30, 2, "row")), layers, False, block_kv)[0] >= 30 * layers


@pytest.mark.parametrize("grid, n, scan", [((4, 9), 2, "row"), ((5, 7), 3, "column"), ((6, 6), 4, "row"),
                                           ((7, 5), 1, "auto")])
@pytest.mark.parametrize("offload", [False, True])
def test_the_memory_models_cache_count_is_the_caches_peak(grid, n, scan, offload):
    schedule = CacheSchedule(plan_batches(*grid, n, scan))
    peak_device, peak_host = replay_cache(schedule, 3, offload, torch.randn(1, 1, 1, 4, 2, 3))
    assert schedule.device_blocks(offload) * 3 == peak_device
    assert (schedule.host_blocks() * 3 if offload else 0) == peak_host
