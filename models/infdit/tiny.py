"""Built-in tiny Inf-DiT models with random weights.

Real weights cannot be downloaded here, so tests, benchmarks and the ComfyUI integration
tests run this code path on a 2-layer, 64-wide network with 16-px blocks (same geometry
rules as the released model: 4-px patches, LR cross-attention at 1/4 of the output, a 3x3
LR-block window; RoPE wraps every 64 tokens so small images exercise the wrap) and a 2-layer
CLIP tower (two heads).
"""

from __future__ import annotations

import torch
from torch import nn

from .checkpoint import InfDiTWeights
from .clip_vision import ClipVisionConfig, ClipVisionEncoder
from .config import InfDiTConfig
from .network import InfDiT

TINY = InfDiTConfig(hidden=64, layers=2, heads=2, patch=4, block=4, lr_block=2, time_channels=32, vector_dim=16,
                    rope_period=64)
TINY_CLIP = ClipVisionConfig(width=128, layers=2, patch=14, image_size=28, embed_dim=16, mlp_width=512)


def randomize_(model: nn.Module, seed: int, std: float = 0.05) -> nn.Module:
    """Deterministic random weights for tests and benchmarks (LayerNorm scales near 1).

    Every tensor gets noise, so segment biases, positional embeddings and zero-initialised
    heads all influence the output (a zero tensor could hide a wrong order).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * std
            is_norm_scale = name.endswith("weight") and param.dim() == 1
            param.copy_(noise + 1.0 if is_norm_scale else noise)
    return model


def tiny_weights(seed: int = 0, cfg: InfDiTConfig = TINY, clip_cfg: ClipVisionConfig | None = TINY_CLIP,
                 dtype: torch.dtype = torch.float32) -> InfDiTWeights:
    """A random Inf-DiT (and CLIP tower unless ``clip_cfg`` is None), deterministic in ``seed``."""
    net = randomize_(InfDiT(cfg), seed).to(dtype).eval().requires_grad_(False)
    clip = None
    if clip_cfg is not None:
        clip = randomize_(ClipVisionEncoder(clip_cfg), seed + 1).to(dtype).eval().requires_grad_(False)
    return InfDiTWeights(net, clip)
