"""The OpenCLIP ViT image tower (exact GELU) and the reference's CLIP preprocessing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ultrares.models.infdit.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_view
from ultrares.models.infdit.tiny import TINY_CLIP, tiny_weights

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def reference_tower(clip, pixels: torch.Tensor, activation) -> torch.Tensor:
    """OpenCLIP's VisionTransformer written with torch.nn.MultiheadAttention, as OpenCLIP does."""
    state = clip.state_dict()
    x = F.conv2d(pixels, state["conv1.weight"], stride=TINY_CLIP.patch).flatten(2).transpose(1, 2)
    x = torch.cat([state["class_embedding"].expand(x.shape[0], 1, -1), x], dim=1) + state["positional_embedding"]
    x = F.layer_norm(x, (TINY_CLIP.width,), state["ln_pre.weight"], state["ln_pre.bias"], eps=1e-5)
    for i in range(TINY_CLIP.layers):
        p = f"transformer.resblocks.{i}."
        attn = torch.nn.MultiheadAttention(TINY_CLIP.width, TINY_CLIP.heads, batch_first=True)
        attn.load_state_dict({k[len(p) + 5:]: v for k, v in state.items() if k.startswith(p + "attn.")})
        y = F.layer_norm(x, (TINY_CLIP.width,), state[p + "ln_1.weight"], state[p + "ln_1.bias"], eps=1e-5)
        x = x + attn(y, y, y, need_weights=False)[0]
        y = F.layer_norm(x, (TINY_CLIP.width,), state[p + "ln_2.weight"], state[p + "ln_2.bias"], eps=1e-5)
        y = activation(F.linear(y, state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"]))
        x = x + F.linear(y, state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"])
    pooled = F.layer_norm(x[:, 0], (TINY_CLIP.width,), state["ln_post.weight"], state["ln_post.bias"], eps=1e-5)
    return pooled @ state["proj"]


def test_the_tower_is_openclips_vit_with_exact_gelu():
    clip = tiny_weights(seed=2).clip
    pixels = torch.randn(2, 3, TINY_CLIP.image_size, TINY_CLIP.image_size)
    with torch.no_grad():
        out = clip(pixels)
        torch.testing.assert_close(out, reference_tower(clip, pixels, F.gelu), rtol=1e-5, atol=1e-5)
        quick_gelu = reference_tower(clip, pixels, lambda t: t * torch.sigmoid(1.702 * t))
    assert (out - quick_gelu).abs().max() > 1e-4


def test_the_embedding_is_the_towers_projected_class_token_normalised_in_fp32():
    clip = tiny_weights(seed=2).clip
    pixels = torch.randn(3, 3, TINY_CLIP.image_size, TINY_CLIP.image_size)
    with torch.no_grad():
        expected = F.normalize(reference_tower(clip, pixels, F.gelu), dim=-1)
        torch.testing.assert_close(clip.encode(pixels), expected, rtol=1e-5, atol=1e-6)
        half = clip.to(torch.bfloat16).encode(pixels)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, expected, rtol=0, atol=0.05)


def test_the_clip_view_resizes_the_shorter_side_then_centre_crops_and_normalises():
    # A horizontal ramp: after resizing 10x30 -> 28x84, the centre crop starts at column 28.
    ramp = torch.linspace(-1, 1, 30).expand(1, 3, 10, 30)
    view = clip_view(ramp, 28)
    assert view.shape == (1, 3, 28, 28)
    resized = F.interpolate((ramp + 1) / 2, size=(28, 84), mode="bicubic", antialias=True)
    mean, std = torch.tensor(OPENAI_CLIP_MEAN)[:, None, None], torch.tensor(OPENAI_CLIP_STD)[:, None, None]
    torch.testing.assert_close(view[0], (resized[0, :, :, 28:56] - mean) / std)
    tall = clip_view(torch.zeros(1, 3, 31, 28), 28)
    assert tall.shape == (1, 3, 28, 28)
