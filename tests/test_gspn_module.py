"""The GSPN attention replacement: which layers it finds, what its output depends on, and that it
works on any H x W map and batch."""

from __future__ import annotations

import pytest
import torch

from gspn_standin import TinyUNet
from ultrares.models.gspn import GSPNAttention, GSPNConfig, GSPNLayers, find_attn1_layers


def _module(dim=6, proxy=3, chunk=4, seed=0):
    torch.manual_seed(seed)
    module = GSPNAttention(dim, proxy, chunk)
    with torch.no_grad():  # non-trivial output projection and merge
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module


def _tokens(n, h, w, dim, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, h * w, dim, generator=g, dtype=torch.float64) for _ in range(3)]


def _grid(t, h, w):
    return t.reshape(t.shape[0], h, w, -1)


def _permute_directions(module, order, mirrored_rows=()):
    """A copy whose direction d uses the original module's direction order[d]; for the directions
    in ``mirrored_rows`` the row - 1 and row + 1 neighbour weights trade places."""
    other = GSPNAttention(module.dim, module.proxy_dim, module.chunk).double()
    other.load_state_dict(module.state_dict())
    with torch.no_grad():
        for d, o in enumerate(order):
            other.directions[d].load_state_dict(module.directions[o].state_dict())
            if d in mirrored_rows:
                weights = other.directions[d].to_weights.weight
                weights.copy_(weights.reshape(3, module.dim, -1).flip(0).reshape(weights.shape))
        other.merge.copy_(module.merge[list(order)])
    return other


class CastingOperations:
    """An ``operations`` namespace shaped like ``comfy.ops.manual_cast``: each Linear keeps its
    weights in their own dtype and casts them to the input's on every call."""

    class Linear(torch.nn.Linear):
        def forward(self, x):
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)


def test_finds_every_unet_self_attention_with_its_patch_key_width_and_level():
    specs = find_attn1_layers(TinyUNet())
    assert [(s.block, s.dim, s.level) for s in specs] == [
        (("input", 1, 0), 16, 0), (("middle", 0, 0), 32, 1), (("output", 1, 0), 32, 1), (("output", 3, 0), 16, 0)]
    assert specs[0].name == "input_blocks.1.1.transformer_blocks.0.attn1"


def test_a_model_without_unet_self_attention_is_refused():
    with pytest.raises(ValueError, match="no UNet self-attention layers"):
        find_attn1_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_layers_get_the_configured_proxy_width_and_chunk():
    layers = GSPNLayers(find_attn1_layers(TinyUNet()), GSPNConfig(chunk=2, proxy_ratio=4))
    module = layers["middle_block.1.transformer_blocks.0.attn1"]
    assert (module.dim, module.proxy_dim, module.chunk) == (32, 8, 2)
    assert module.directions[3].to_weights.weight.shape == (3 * 32, 8)
    stored = layers.named_state()["middle_block.1.transformer_blocks.0.attn1.to_weights.weight"]
    assert stored.shape == (4 * 3 * 32, 8)  # the file keeps one matrix over the four directions
    assert torch.equal(stored[3 * 3 * 32:], module.directions[3].to_weights.weight)


def test_every_linear_layer_is_built_from_the_given_operations_and_runs_through_its_forward():
    plain = _module()
    cast = GSPNAttention(6, 3, 4, operations=CastingOperations)
    linears = [m for m in cast.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 + 4 * 4 and all(isinstance(m, CastingOperations.Linear) for m in linears)
    cast.load_state_dict(plain.state_dict())
    for layer in linears:  # weights kept in float64: only the operations' own forward can use them
        layer.double()
    q, k, v = (t.float() for t in _tokens(2, 3, 5, 6))
    assert torch.equal(cast(q, k, v, 3, 5), plain(q, k, v, 3, 5))


def test_a_seed_draws_the_same_modules_in_the_files_layout_whatever_the_operations_skip():
    class SkippingOperations:  # like comfy.ops.disable_weight_init: the layers draw nothing themselves
        class Linear(torch.nn.Linear):
            def reset_parameters(self):
                return None

    torch.manual_seed(5)
    plain = GSPNAttention(6, 3)
    torch.manual_seed(5)
    skipping = GSPNAttention(6, 3, operations=SkippingOperations)
    for key, value in plain.state_dict().items():
        assert torch.equal(skipping.state_dict()[key], value), key
    torch.manual_seed(5)
    fused = torch.empty(4 * 3 * 6, 3)
    torch.nn.init.kaiming_uniform_(torch.empty(3, 6), a=5 ** 0.5)  # to_proxy is drawn first
    torch.nn.init.kaiming_uniform_(fused, a=5 ** 0.5)
    assert torch.equal(torch.cat([d.to_weights.weight for d in plain.directions]), fused)
    torch.testing.assert_close(plain.to_out.weight, torch.eye(6), rtol=0, atol=0)


def test_transposing_the_map_swaps_horizontal_and_vertical_directions_on_a_non_square_map():
    module = _module().double()
    h, w = 3, 5
    q, k, v = _tokens(2, h, w, 6)
    out = _grid(module(q, k, v, h, w), h, w)
    transposed = [_grid(t, h, w).transpose(1, 2).reshape(2, h * w, 6) for t in (q, k, v)]
    swapped = _permute_directions(module, (1, 0, 3, 2))
    out_t = _grid(swapped(*transposed, w, h), w, h)
    torch.testing.assert_close(out_t, out.transpose(1, 2))


def test_mirroring_the_map_swaps_opposite_directions():
    module = _module().double()
    h, w = 4, 3
    q, k, v = _tokens(1, h, w, 6)
    out = _grid(module(q, k, v, h, w), h, w)
    mirrored = [_grid(t, h, w).flip(2).reshape(1, h * w, 6) for t in (q, k, v)]
    out_m = _grid(_permute_directions(module, (2, 1, 0, 3), mirrored_rows=(1, 3))(*mirrored, h, w), h, w)
    torch.testing.assert_close(out_m, out.flip(2))


def test_each_image_of_a_batch_is_processed_on_its_own():
    module = _module().double()
    q, k, v = _tokens(3, 4, 6, 6)
    together = module(q, k, v, 4, 6)
    for i in range(3):
        torch.testing.assert_close(together[i:i + 1], module(q[i:i + 1], k[i:i + 1], v[i:i + 1], 4, 6))


@pytest.mark.parametrize("chunk", [2, 3])
def test_a_pixel_only_sees_pixels_within_chunk_minus_one_steps(chunk):
    module = _module(chunk=chunk).double()
    h, w = 7, 8
    q, k, v = (t.requires_grad_() for t in _tokens(1, h, w, 6))
    out = _grid(module(q, k, v, h, w), h, w)
    # The last step of the first chunk (left->right and top->bottom): it sees chunk - 1 steps back,
    # and through the three-neighbour stencil chunk - 1 rows to either side.
    p = chunk - 1
    out[0, p, p].sum().backward()
    reach = torch.zeros(h, w, dtype=torch.bool)
    for t in (q, k, v):
        reach |= _grid(t.grad, h, w)[0].abs().sum(-1) > 0
    rows, cols = torch.nonzero(reach, as_tuple=True)
    assert rows.max() == 2 * p and cols.max() == 2 * p


def test_global_scan_reaches_the_whole_map():
    module = _module(chunk=None).double()
    q, k, v = (t.requires_grad_() for t in _tokens(1, 4, 5, 6))
    _grid(module(q, k, v, 4, 5), 4, 5)[0, 0, 0].sum().backward()
    assert torch.all(_grid(v.grad, 4, 5)[0].abs().sum(-1) > 0)


def test_triton_and_reference_backends_give_the_same_layer_output(triton_device):
    module = _module().to(triton_device)
    q, k, v = (t.float().to(triton_device) for t in _tokens(2, 3, 5, 6))
    torch.testing.assert_close(module(q, k, v, 3, 5, backend="triton"), module(q, k, v, 3, 5, backend="torch"))


def test_wrong_token_count_is_refused():
    module = _module()
    q = torch.zeros(1, 12, 6)
    with pytest.raises(ValueError, match="for a 3x5 map"):
        module(q, q, q, 3, 5)
