"""The OpenCLIP ViT-L/14 (DataComp-XL) image tower that gives Inf-DiT its 768-d condition.

Parameter names follow OpenCLIP's ``VisionTransformer`` (``conv1``, ``class_embedding``,
``transformer.resblocks.{i}.attn.in_proj_weight`` ...), so OpenCLIP checkpoints load by
stripping their ``visual.`` prefix. This tower uses the *exact* (erf) GELU of OpenCLIP's
``ViT-L-14`` config; ComfyUI's built-in ViT-L/14 vision config uses quick_gelu (OpenAI CLIP)
and would give different embeddings for these weights. Its Linear, Conv2d and LayerNorm
layers come from ``operations`` (see :data:`.network.Operations`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .network import Operations

OPENCLIP_HEAD_WIDTH = 64


@dataclass(frozen=True)
class ClipVisionConfig:
    """Sizes of one OpenCLIP ViT image tower (defaults: ViT-L/14 at 224 px)."""

    width: int = 1024
    layers: int = 24
    patch: int = 14
    image_size: int = 224
    embed_dim: int = 768
    mlp_width: int = 4096
    eps: float = 1e-5

    @property
    def heads(self) -> int:
        return max(1, self.width // OPENCLIP_HEAD_WIDTH)

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch) ** 2 + 1


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameters (OpenCLIP's names), run with fused attention."""

    def __init__(self, width: int, heads: int, operations: Operations = nn):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = operations.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).unflatten(-1, (3, self.heads, -1)).unbind(-3)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.out_proj(out.transpose(1, 2).flatten(2))


class ResidualBlock(nn.Module):
    """Pre-LN attention and MLP (exact GELU)."""

    def __init__(self, cfg: ClipVisionConfig, operations: Operations = nn):
        super().__init__()
        self.ln_1 = operations.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = SelfAttention(cfg.width, cfg.heads, operations)
        self.ln_2 = operations.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", operations.Linear(cfg.width, cfg.mlp_width))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", operations.Linear(cfg.mlp_width, cfg.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """The residual blocks, under OpenCLIP's ``transformer.resblocks`` names."""

    def __init__(self, cfg: ClipVisionConfig, operations: Operations = nn):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualBlock(cfg, operations) for _ in range(cfg.layers))


class ClipVisionEncoder(nn.Module):
    """OpenCLIP's ``VisionTransformer``: normalised CLIP pixels -> the projected class token."""

    def __init__(self, cfg: ClipVisionConfig = ClipVisionConfig(), operations: Operations = nn):
        super().__init__()
        self.cfg = cfg
        self.conv1 = operations.Conv2d(3, cfg.width, kernel_size=cfg.patch, stride=cfg.patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.tokens, cfg.width))
        self.ln_pre = operations.LayerNorm(cfg.width, eps=cfg.eps)
        self.transformer = Transformer(cfg, operations)
        self.ln_post = operations.LayerNorm(cfg.width, eps=cfg.eps)
        self.proj = nn.Parameter(torch.zeros(cfg.width, cfg.embed_dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised CLIP pixels ``[B, 3, S, S]`` -> projected class token ``[B, embed_dim]``."""
        x = self.conv1(pixels.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.ln_pre(x)
        for block in self.transformer.resblocks:
            x = block(x)
        return self.ln_post(x[:, 0]) @ self.proj

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP pixels -> L2-normalised embedding in fp32, as the reference computes it
        (``encode_image(normalize=True)``, then normalised once more)."""
        out = self.forward(pixels.to(self.conv1.weight.device)).float()
        return F.normalize(F.normalize(out, dim=-1), dim=-1)
