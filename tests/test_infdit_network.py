"""The network reproduces the released model's maths, quirks included."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ultrares.models.infdit._full_reference import full_table, reference_gather, reference_rope_table
from ultrares.models.infdit.attention import (SEGMENTS, RotaryTable, apply_rope, blocks_to_image, gather_segments,
                                             table_diagonal, to_blocks, token_positions)
from ultrares.models.infdit.network import modulate
from ultrares.models.infdit.schedule import BlockBatch
from ultrares.models.infdit.tiny import TINY, tiny_weights

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def reference_rotate_half(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    out[..., 0::2], out[..., 1::2] = -x[..., 1::2], x[..., 0::2]
    return out


@pytest.mark.parametrize("period", [64, 200])  # 200: the reference's positions i / 200 * 200 are not all whole
def test_a_new_rope_table_is_the_reference_table_with_interleaved_pairs(period):
    cos_table, sin_table = reference_rope_table(period, 32)
    rows, cols = torch.randint(0, period, (50,)), torch.randint(0, period, (50,))
    cos, sin = RotaryTable(period, 32)(rows, cols)
    assert torch.equal(cos, cos_table[rows, cols]) and torch.equal(sin, sin_table[rows, cols])
    t = torch.randn(50, 32)
    expected = t * cos_table[rows, cols] + reference_rotate_half(t) * sin_table[rows, cols]
    assert torch.equal(apply_rope(t, cos, sin), expected)


def test_a_table_is_its_diagonal_row_part_then_column_part():
    cos_table, _ = reference_rope_table(64, 32)
    diagonal = table_diagonal(cos_table.bfloat16())
    assert diagonal.shape == (64, 32) and diagonal.dtype == torch.bfloat16
    assert torch.equal(full_table(diagonal), cos_table.bfloat16())
    odd = cos_table.clone()
    odd[5, 9, 3] += 1e-3  # one entry that no row part and column part give
    with pytest.raises(ValueError, match="not a 2D rotary table"):
        table_diagonal(odd)
    with pytest.raises(ValueError, match=r"shape \(64, 32, 32\) is not \[period, period, head_dim\]"):
        table_diagonal(cos_table[:, :32])


def test_the_lookup_uses_the_tables_values_in_their_dtype():
    table = RotaryTable(64, 32).bfloat16()
    cos, sin = table(torch.tensor([3, 40]), torch.tensor([7, 1]))
    assert cos.dtype == torch.bfloat16
    assert torch.equal(cos[1], torch.cat([table.cos[40, :16], table.cos[1, 16:]]))
    assert torch.equal(sin[0], torch.cat([table.sin[3, :16], table.sin[7, 16:]]))


def test_rope_scores_depend_only_on_position_differences():
    q, k = torch.randn(32, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
    table = RotaryTable(1024, 32).double()

    def score(qpos, kpos):
        (cq, sq), (ck, sk) = (table(torch.tensor(p[0]), torch.tensor(p[1])) for p in (qpos, kpos))
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    assert math.isclose(score((3, 4), (1, 9)), score((13, 24), (11, 29)), rel_tol=1e-5)
    assert not math.isclose(score((3, 4), (1, 9)), score((3, 4), (2, 9)), rel_tol=1e-3)


def test_rope_positions_wrap_at_the_period():
    table = RotaryTable(64, 32)
    a = table(torch.tensor([3, 70]), torch.tensor([5, 200]))
    b = table(torch.tensor([3, 6]), torch.tensor([5, 8]))
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
    cos, sin = net.rope(rows, cols)
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


def released_layer(net, index, h, cond, cos, sin, window_kv=None):
    """``AdaLNMixin.layer_forward`` written out with the checkpoint's tensors and plain ops."""
    p, blk, head_dim = net.state_dict(), f"blocks.{index}.", TINY.head_dim

    def linear(x, name):
        return F.linear(x, p[name + ".weight"], p[name + ".bias"])

    def norm(x, name=None):  # non-affine, or with the LayerNorm weights of ``name``
        affine = (None, None) if name is None else (p[name + ".weight"], p[name + ".bias"])
        return F.layer_norm(x, x.shape[-1:], *affine, eps=1e-6)

    def mod(x, shift, scale):  # per-image [B, D] vectors over every block's tokens
        return x * (1 + scale[:, None, None, None]) + shift[:, None, None, None]

    def heads(t):
        return t.unflatten(-1, (TINY.heads, head_dim))

    def attend(q, k, v):
        scores = torch.einsum("brcqhd,brckhd->brchqk", q, k) / math.sqrt(head_dim)
        return torch.einsum("brchqk,brckhd->brcqhd", scores.softmax(dim=-1), v).flatten(-2)

    def rope(t):
        return t * cos + reference_rotate_half(t) * sin

    shift_msa, scale_msa, shift_mlp, scale_mlp = cond.layers[index].chunk(4, dim=-1)
    q, k, v = linear(mod(norm(h), shift_msa, scale_msa), blk + "qkv").chunk(3, dim=-1)
    q, k = rope(norm(heads(q), blk + "qk_norm")), rope(norm(heads(k), blk + "qk_norm"))
    keys = reference_gather(k) + p[blk + "block_bias"].repeat_interleave(TINY.block_tokens, dim=0)
    h = h + linear(attend(q, keys, reference_gather(heads(v))), blk + "attn_out")
    if index == 0:
        lr_q = norm(heads(linear(norm(h), "lr_xattn.query")), "lr_xattn.q_norm") + p["lr_xattn.query_pos"][0]
        lr_k, lr_v = window_kv.unbind(-3)
        h = h + linear(attend(lr_q, lr_k + p["lr_xattn.key_pos"][0], lr_v), "lr_xattn.dense")
        m = norm(h, "lr_xattn.post_norm")
    else:
        m = norm(h)
    return h + linear(F.gelu(linear(mod(m, shift_mlp, scale_mlp), blk + "fc1"), approximate="tanh"), blk + "fc2")


@pytest.mark.parametrize("index", [0, 1])
def test_a_layer_is_the_released_order_of_operations(layer_inputs, index):
    net, h, cond, cos, sin = layer_inputs
    window_kv = torch.randn(1, 2, 2, TINY.lr_window_tokens, 2, TINY.heads, TINY.head_dim) if index == 0 else None
    gather = lambda layer, k, v: (reference_gather(k), reference_gather(v))  # noqa: E731
    with torch.no_grad():
        out = net.layer(index, h, cond, cos, sin, gather, window_kv)
        expected = released_layer(net, index, h, cond, cos, sin, window_kv)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
