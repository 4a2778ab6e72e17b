"""The network reproduces the released model's maths, quirks included."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ultrares.models.infdit.network import modulate
from ultrares.models.infdit.plan import BlockBatch
from ultrares.models.infdit.rope import apply_rope, rope_cos_sin
from ultrares.models.infdit.tiny import TINY, tiny_weights
from ultrares.models.infdit.uniba import SEGMENTS, blocks_to_image, gather_segments, to_blocks, token_positions

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def reference_rope_table(period: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's pix2struct table: per axis, frequencies repeated in adjacent pairs; rows
    first, then columns; ``[period, period, head_dim]``."""
    half = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    t = torch.arange(period) / period * period
    axis = torch.einsum("i,f->if", t, freqs).repeat_interleave(2, dim=-1)
    table = torch.cat([axis[:, None, :].expand(-1, period, -1), axis[None, :, :].expand(period, -1, -1)], dim=-1)
    return table.cos(), table.sin()


def reference_rotate_half(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    out[..., 0::2], out[..., 1::2] = -x[..., 1::2], x[..., 0::2]
    return out


def test_rope_matches_the_reference_table_with_interleaved_pairs():
    cos_table, sin_table = reference_rope_table(64, 32)
    rows, cols = torch.tensor([0, 3, 17, 63]), torch.tensor([5, 0, 40, 63])
    cos, sin = rope_cos_sin(rows, cols, 32, 64, torch.float32)
    assert torch.equal(cos, cos_table[rows, cols]) and torch.equal(sin, sin_table[rows, cols])
    t = torch.randn(4, 32)
    expected = t * cos_table[rows, cols] + reference_rotate_half(t) * sin_table[rows, cols]
    assert torch.equal(apply_rope(t, cos, sin), expected)


def test_rope_scores_depend_only_on_position_differences():
    q, k = torch.randn(32, dtype=torch.float64), torch.randn(32, dtype=torch.float64)

    def score(qpos, kpos):
        (cq, sq), (ck, sk) = (rope_cos_sin(torch.tensor(p[0]), torch.tensor(p[1]), 32, 1024, torch.float64)
                              for p in (qpos, kpos))
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    assert math.isclose(score((3, 4), (1, 9)), score((13, 24), (11, 29)), rel_tol=1e-5)
    assert not math.isclose(score((3, 4), (1, 9)), score((3, 4), (2, 9)), rel_tol=1e-3)


def test_rope_positions_wrap_at_the_period():
    a = rope_cos_sin(torch.tensor([3, 70]), torch.tensor([5, 200]), 32, 64, torch.float32)
    b = rope_cos_sin(torch.tensor([3, 6]), torch.tensor([5, 8]), 32, 64, torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_timestep_embedding_is_cos_then_sin_of_a_quarter_log_sigma():
    net = tiny_weights(seed=1).net
    sigma = torch.tensor([0.3, 40.0])
    c_noise = 0.25 * sigma.log()
    half = TINY.time_channels // 2
    angles = c_noise[:, None] * (1e-4 ** (torch.arange(half) / half))
    features = torch.cat([angles.cos(), angles.sin()], dim=1)
    emb = net.time_embed
    expected = emb.fc2(F.silu(emb.fc1(features)))
    torch.testing.assert_close(emb(c_noise), expected)


def test_every_modulation_sees_silu_twice():
    net = tiny_weights(seed=1).net
    c_noise, vector = torch.tensor([0.1]), torch.randn(1, TINY.vector_dim)
    cond = net.conditioning(c_noise, vector)
    e = F.silu(net.time_embed(c_noise) + net.vector_embed(vector))
    torch.testing.assert_close(cond.layers[1], net.blocks[1].ada(F.silu(e)))
    torch.testing.assert_close(cond.final, net.final.ada(F.silu(e)))


def test_the_final_layer_normalises_twice_before_its_modulation():
    net = tiny_weights(seed=1).net
    cond = net.conditioning(torch.tensor([0.1]), torch.randn(1, TINY.vector_dim))
    h = torch.randn(1, 1, 2, TINY.block_tokens, TINY.hidden) * 3 + 1
    shift, scale = cond.final.chunk(2, dim=-1)
    norm = lambda x: F.layer_norm(x, (TINY.hidden,), eps=1e-6)  # noqa: E731
    tokens = net.final.linear(modulate(norm(norm(h)), shift, scale))
    torch.testing.assert_close(net.output(h, cond), blocks_to_image(tokens, TINY.block, TINY.patch, 3))


def test_unpatchify_orders_token_values_as_row_column_channel():
    block, patch, channels = 2, 3, 3
    image = torch.randn(1, channels, 2 * block * patch, 3 * block * patch)
    # Patchify as the final Linear lays values out: per token (py, px, c).
    grid = image.unflatten(2, (-1, patch)).unflatten(4, (-1, patch)).permute(0, 2, 4, 3, 5, 1).flatten(3)
    tokens = to_blocks(grid.permute(0, 3, 1, 2), block)
    assert torch.equal(blocks_to_image(tokens, block, patch, channels), image)


def test_block_layout_round_trips_the_token_grid():
    grid = torch.arange(2 * 4 * 6).float().view(1, 2, 4, 6)
    blocks = to_blocks(grid, 2)
    assert blocks.shape == (1, 2, 3, 4, 2)
    assert blocks[0, 1, 2, :, 0].tolist() == [grid[0, 0, 2, 4].item(), grid[0, 0, 2, 5].item(),
                                              grid[0, 0, 3, 4].item(), grid[0, 0, 3, 5].item()]


def clamped_extension(k: torch.Tensor) -> torch.Tensor:
    """The extended grid of a whole image: each cell holds its clamped source block."""
    rows, cols = k.shape[1:3]
    batch = BlockBatch(range(rows), range(cols))
    cells = [[k[:, i, j] for i, j in (batch.extended_source(a, b) for b in range(cols + 1))] for a in range(rows + 1)]
    return torch.stack([torch.stack(row, dim=1) for row in cells], dim=1)


def _captured_segments(grid_blocks):
    """Random block keys of a whole image and their gathered segments ``[1, R, C, 4, L, H, d]``."""
    k = torch.randn(1, *grid_blocks, TINY.block_tokens, TINY.heads, TINY.head_dim)
    return k, gather_segments(clamped_extension(k)).unflatten(3, (len(SEGMENTS), TINY.block_tokens))


def test_border_blocks_see_clamped_copies_of_themselves_and_their_neighbours():
    k, seg = _captured_segments((1, 1))
    assert all(torch.equal(seg[0, 0, 0, s], k[0, 0, 0]) for s in range(4))
    k, seg = _captured_segments((3, 4))
    segment = dict(zip(SEGMENTS, range(4)))
    # Row 0: top is the block itself, top-left is its left neighbour.
    assert torch.equal(seg[0, 0, 2, segment["top"]], k[0, 0, 2])
    assert torch.equal(seg[0, 0, 2, segment["top-left"]], k[0, 0, 1])
    # Column 0: left is the block itself, top-left is the block above.
    assert torch.equal(seg[0, 2, 0, segment["left"]], k[0, 2, 0])
    assert torch.equal(seg[0, 2, 0, segment["top-left"]], k[0, 1, 0])
    # Inside: the real neighbours, in the order self, top-left, left, top.
    for s, (i, j) in enumerate([(2, 3), (1, 2), (2, 2), (1, 3)]):
        assert torch.equal(seg[0, 2, 3, s], k[0, i, j]), SEGMENTS[s]


def _one_layer(net, h, cond, cos, sin, capture=None):
    def neighbours(layer, k, v):
        if capture is not None:
            capture.append(k)
        return gather_segments(clamped_extension(k)), gather_segments(clamped_extension(v))
    return net.layer(1, h, cond, cos, sin, neighbours)


@pytest.fixture
def layer_inputs():
    """A 2x2-block image: block (1, 1) has four distinct neighbour segments."""
    net = tiny_weights(seed=2).net
    cond = net.conditioning(torch.tensor([0.2]), torch.randn(1, TINY.vector_dim))
    h = torch.randn(1, 2, 2, TINY.block_tokens, TINY.hidden)
    rows, cols = token_positions(range(2), range(2), TINY.block)
    cos, sin = rope_cos_sin(rows, cols, TINY.head_dim, 64, torch.float32)
    return net, h, cond, cos[..., None, :], sin[..., None, :]


@pytest.mark.parametrize("a, b", [(0, 1), (1, 2), (2, 3), (1, 3)])
def test_swapping_two_block_bias_segments_changes_the_output(layer_inputs, a, b):
    net, h, cond, cos, sin = layer_inputs
    before = _one_layer(net, h, cond, cos, sin)
    with torch.no_grad():
        net.blocks[1].block_bias[[a, b]] = net.blocks[1].block_bias[[b, a]].clone()
    assert not torch.allclose(_one_layer(net, h, cond, cos, sin)[:, 1, 1], before[:, 1, 1])


def test_keys_are_normalised_with_the_query_layernorm(layer_inputs):
    net, h, cond, cos, sin = layer_inputs
    captured = []
    _one_layer(net, h, cond, cos, sin, captured)
    blk = net.blocks[1]
    shift, scale = cond.layers[1].chunk(4, dim=-1)[:2]
    a = modulate(F.layer_norm(h, (TINY.hidden,), eps=1e-6), shift, scale)
    k = blk.qkv(a).unflatten(-1, (3, TINY.heads, -1))[..., 1, :, :]
    torch.testing.assert_close(captured[0], apply_rope(blk.qk_norm(k), cos, sin))
    with torch.no_grad():
        blk.qk_norm.weight.mul_(1.5)
    captured.clear()
    _one_layer(net, h, cond, cos, sin, captured)
    torch.testing.assert_close(captured[0], apply_rope(blk.qk_norm(k), cos, sin))
