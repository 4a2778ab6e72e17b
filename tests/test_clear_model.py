"""CLEAR's host-free model layer (models/clear): which pattern a file asks for, the scale and
RoPE base of the high-resolution recipe, the down-sampled branch, and one attention call."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ultrares.kernels._clear_reference import dense_reference
from ultrares.models.clear.attention import ClearAttention, TokenLayout
from ultrares.models.clear.downsample import down_sample, down_sampled_count, mean_spatial_weight
from ultrares.models.clear.pattern import ClearPattern, ntk_theta, resolve_pattern, softmax_scale


@pytest.mark.parametrize("name, radius, down", [
    ("clear_local_32.safetensors", 32, 1), ("clear_local_16.safetensors", 16, 1), ("clear_local_8.safetensors", 8, 1),
    ("clear_local_16_down_4.safetensors", 16, 4), ("CLEAR/clear_local_8_down_4.safetensors", 8, 4)])
def test_the_released_names_give_their_window(name, radius, down):
    assert resolve_pattern(name, spatial_size=down if down > 1 else None) == ClearPattern(radius, down)


def test_metadata_beats_the_name_and_explicit_settings_fill_in_what_the_file_does_not_say():
    assert resolve_pattern("clear_local_8.safetensors", {"window_size": "12"}) == ClearPattern(12, 1)
    assert resolve_pattern("renamed.safetensors", {"window_size": "12", "down_factor": "2"},
                           spatial_size=2) == ClearPattern(12, 2)
    assert resolve_pattern("clear_local_8_down_4.safetensors", spatial_size=4, radius=8, down_factor=4) == \
        ClearPattern(8, 4)
    assert resolve_pattern(None, radius=5) == ClearPattern(5, 1)
    assert resolve_pattern("weights.safetensors", spatial_size=4, radius=5) == ClearPattern(5, 4)


def test_explicit_settings_that_contradict_the_file_are_refused():
    with pytest.raises(ValueError, match="made for window_radius 8 \\(its name says so\\), but window_radius is set "
                                         "to 20: set it to 0 \\(the file's\\) or 8"):
        resolve_pattern("clear_local_8_down_4.safetensors", spatial_size=4, radius=20)
    with pytest.raises(ValueError, match="made for down_factor 1 \\(its name says so\\), but down_factor is set to 2"):
        resolve_pattern("clear_local_8.safetensors", down_factor=2)
    with pytest.raises(ValueError, match="made for window_radius 12 \\(its metadata says so\\)"):
        resolve_pattern("clear_local_12.safetensors", {"window_size": "12"}, radius=16)
    with pytest.raises(ValueError, match="made for down_factor 4 \\(its spatial_weight says so\\)"):
        resolve_pattern("weights.safetensors", spatial_size=4, radius=5, down_factor=2)


def test_a_pattern_that_cannot_be_known_or_contradicts_the_file_is_refused():
    with pytest.raises(ValueError, match="mystery.safetensors has no 'window_size' metadata.*set window_radius"):
        resolve_pattern("mystery.safetensors")
    with pytest.raises(ValueError, match="no CLEAR weights file is selected"):
        resolve_pattern(None)
    with pytest.raises(ValueError, match="made for down_factor 4.*set to 2"):
        resolve_pattern("clear_local_8_down_4.safetensors", spatial_size=4, down_factor=2)
    with pytest.raises(ValueError, match="trained with down factor 4.*down factor 1"):
        resolve_pattern("clear_local_8.safetensors", spatial_size=4)
    with pytest.raises(ValueError, match="not an integer"):
        resolve_pattern("x.safetensors", {"window_size": "wide"})


def test_a_pattern_covers_a_grid_when_the_circle_holds_the_far_corner():
    assert ClearPattern(10).covers((7, 8)) and not ClearPattern(9).covers((7, 8))  # 6**2 + 7**2 = 85


def test_the_proportional_scale_is_the_log_of_the_key_count_in_base_4608():
    assert softmax_scale(128, 5000, proportional=False, down_sampled=True) == 128 ** -0.5
    assert softmax_scale(128, 4608, proportional=True, down_sampled=False) == pytest.approx(128 ** -0.5)
    n = 512 + 256 * 256
    assert softmax_scale(128, n, True, False) == pytest.approx(math.sqrt(math.log(n) / math.log(4608) / 128))
    assert softmax_scale(128, n, True, True) == pytest.approx(math.sqrt(math.log(10 * n) / math.log(4608) / 128))


def test_the_ntk_factor_multiplies_the_rope_base():
    assert ntk_theta(10000, 10) == 100000
    with pytest.raises(ValueError):
        ntk_theta(10000, 0.5)


def reference_down_sample(x, height, width, text_length, spatial_weight):
    """The reference's cell sum (LocalDownsampleFlexAttnProcessor), transcribed."""
    d = spatial_weight.shape[3]
    return (x[:, :, text_length:].unflatten(2, (height // d, d, width // d, d)) * spatial_weight).sum(dim=(3, 5)).flatten(2, 3)


def test_down_sampling_a_divisible_grid_is_the_reference_cell_sum():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5 + 8 * 12, 16, generator=g)
    weight = torch.randn(4, 4, generator=g)
    expected = reference_down_sample(x, 8, 12, 5, weight.reshape(1, 1, 1, 4, 1, 4, 1))
    torch.testing.assert_close(down_sample(x, (8, 12), 5, weight), expected)
    assert down_sampled_count((8, 12), 4) == expected.shape[2] == 6


def test_down_sampling_in_bfloat16_rounds_like_the_reference():
    # the reference multiplies bfloat16 keys by its bfloat16 spatial_weight and sums each cell
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 4 + 8 * 8, 32, generator=g).to(torch.bfloat16)
    weight = torch.rand(4, 4, generator=g) / 4
    expected = reference_down_sample(x, 8, 8, 4, weight.to(torch.bfloat16).reshape(1, 1, 1, 4, 1, 4, 1))
    out = down_sample(x, (8, 8), 4, weight)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=2 ** -8, atol=0)


def test_down_sampling_keeps_only_complete_cells_of_an_uneven_grid():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 3 + 9 * 14 + 4, 8, generator=g)  # 4 reference tokens after the image are ignored
    weight = torch.randn(4, 4, generator=g)
    cropped = x[:, :, 3:3 + 9 * 14].unflatten(2, (9, 14))[:, :, :8, :12].flatten(2, 3)
    expected = reference_down_sample(cropped, 8, 12, 0, weight.reshape(1, 1, 1, 4, 1, 4, 1))
    torch.testing.assert_close(down_sample(x, (9, 14), 3, weight), expected)
    assert down_sampled_count((9, 14), 4) == 6 and down_sampled_count((3, 14), 4) == 0


def test_the_mean_weight_is_average_pooling():
    x = torch.randn(1, 2, 6 * 10, 8)
    pooled = F.avg_pool2d(x.unflatten(2, (6, 10)).permute(0, 1, 4, 2, 3).flatten(1, 2), 2)
    expected = pooled.unflatten(1, (2, 8)).permute(0, 1, 3, 4, 2).flatten(2, 3)
    torch.testing.assert_close(down_sample(x, (6, 10), 0, mean_spatial_weight(2)), expected)


def test_the_token_layout_finds_the_text_in_front_of_the_image():
    layout = TokenLayout((4, 5), n_ref=6)
    assert layout.text_tokens(3 + 20 + 6) == 3 and layout.text_tokens(25) is None


def test_one_call_is_the_dense_pattern_with_this_layers_down_sampled_keys_and_scale():
    g = torch.Generator().manual_seed(2)
    layout = TokenLayout((9, 10), n_ref=4)
    q, k, v = (torch.randn(2, 2, 5 + 90 + 4, 16, generator=g) for _ in range(3))
    weights = {("double", 0): torch.randn(3, 3, generator=g), ("single", 1): torch.randn(3, 3, generator=g)}
    attention = ClearAttention(ClearPattern(4, 3), weights, proportional=True)
    out = attention(q, k, v, layout, ("single", 1))
    down = [down_sample(t, (9, 10), 5, weights[("single", 1)]) for t in (k, v)]
    scale = math.sqrt(math.log(10 * 99, 4608) / 16)
    expected = dense_reference(q, k, v, grid=(9, 10), n_txt=5, radius=4, n_ref=4, down_k=down[0], down_v=down[1],
                               scale=scale)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, attention(q, k, v, layout, ("double", 0)))


def test_per_layer_weights_need_the_calling_block_and_no_weights_mean_the_mean():
    layout = TokenLayout((4, 4))
    q, k, v = (torch.randn(1, 1, 2 + 16, 16) for _ in range(3))
    with pytest.raises(RuntimeError, match="did not say which block"):
        ClearAttention(ClearPattern(2, 2), {("double", 0): torch.ones(2, 2)})(q, k, v, layout)
    with pytest.raises(RuntimeError, match="single block 7"):
        ClearAttention(ClearPattern(2, 2), {("double", 0): torch.ones(2, 2)})(q, k, v, layout, ("single", 7))
    out = ClearAttention(ClearPattern(2, 2))(q, k, v, layout)
    down = [down_sample(t, (4, 4), 2, mean_spatial_weight(2)) for t in (k, v)]
    expected = dense_reference(q, k, v, grid=(4, 4), n_txt=2, radius=2, down_k=down[0], down_v=down[1])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_only_a_covering_window_without_extras_counts_as_plain_attention():
    layout = TokenLayout((5, 5))
    assert ClearAttention(ClearPattern(6)).is_plain_attention(layout)
    assert not ClearAttention(ClearPattern(5)).is_plain_attention(layout)
    assert not ClearAttention(ClearPattern(6, 2)).is_plain_attention(layout)
    assert not ClearAttention(ClearPattern(6), proportional=True).is_plain_attention(layout)
    assert ClearAttention(ClearPattern(6, 2), {("double", 0): torch.ones(2, 2)}).needs_block()
    assert not ClearAttention(ClearPattern(6, 2)).needs_block()
