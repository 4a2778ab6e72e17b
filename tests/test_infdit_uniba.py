"""Block-scheduled evaluation is exactly the whole-image UniBA computation.

The reference is the package's whole-image Inf-DiT (``models/infdit/_full_reference.py``),
written from the released "full" inference: positions from the token index, the
clamp-and-concatenate neighbour gather of ``get_cat_layer_left_top`` and the LR windows of
``nn.Unfold`` after ``proj_lr``. The scheduler must match it for any batch size, ragged edge
batches, either scan order and either cache placement.
"""

from __future__ import annotations

import ast
import inspect

import pytest
import torch

from ultrares.models.infdit import _full_reference
from ultrares.models.infdit._full_reference import reference_evaluation
from ultrares.models.infdit.evaluate import ImageContext, LRContext, evaluate
from ultrares.models.infdit.schedule import BlockBatch, Placement, plan_batches, plan_schedule
from ultrares.models.infdit.tiny import tiny_weights

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
        return evaluate(net, x, sigma, context, plan_schedule(batches, offload), placement, torch.empty_like(x))


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


def test_the_reference_uses_none_of_the_schedulers_modules():
    tree = ast.parse(inspect.getsource(_full_reference))
    names = {(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level
             for alias in node.names}
    # The block layout (the network it is handed uses it too) and the CLIP preprocessing only.
    assert names == {("attention", "to_blocks"), ("preprocess", "clip_view")}


def test_a_schedule_planned_for_other_offloading_than_the_placement_is_refused(case):
    net, x, concat_lr, lr_image, vector, _ = case
    placement = Placement(CPU, offload=True)
    with torch.inference_mode():
        context = ImageContext(placement.to_store(concat_lr), LRContext(net, lr_image, placement), vector)
        with pytest.raises(ValueError, match="planned with offload=False"):
            evaluate(net, x, 2.5, context, plan_schedule(plan_batches(*GRID, 2, "row"), offload=False), placement,
                     torch.empty_like(x))
