"""The Inf-DiT network in plain PyTorch, evaluated one rectangle of UniBA blocks at a time.

The module holds the weights and runs the per-token maths; *which* keys a block attends to
comes from a ``neighbours`` callback (see :mod:`.schedule`), so the same code evaluates the
whole image or an n x n batch of blocks with cached neighbours.

Quirks of the released model that change numbers and are reproduced here:

- the keys are normalised with the *query* LayerNorm (the checkpoint's key LayerNorm is unused);
- SiLU is applied twice before every modulation Linear (once when the embedding is formed,
  once inside each adaLN head);
- the hidden state is layer-normalised twice before the final modulation;
- layer 0 adds the nearby-LR cross-attention and then uses its own affine LayerNorm before
  the MLP; every other LayerNorm of the trunk has no affine parameters;
- the MLP uses the tanh approximation of GELU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import RotaryTable, apply_rope, block_attention, blocks_to_image, to_blocks
from .config import InfDiTConfig

Neighbours = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``(layer, k, v) -> (keys, values)``: a batch's own K/V in block layout to its gathered
``[B, nr, nc, 4L, heads, head_dim]`` segments (self, top-left, left, top), before the block bias."""


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation with per-image ``[B, D]`` shift and scale on a block-layout tensor."""
    view = (shift.shape[0],) + (1,) * (x.dim() - 2) + (shift.shape[-1],)
    return x * (1 + scale.view(view)) + shift.view(view)


class TwoLayerMLP(nn.Module):
    """Linear -> SiLU -> Linear: the timestep and CLIP-vector embeddings."""

    def __init__(self, inputs: int, width: int):
        super().__init__()
        self.fc1 = nn.Linear(inputs, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


class TimestepEmbedding(TwoLayerMLP):
    """EDM noise level ``c_noise`` -> ``[B, hidden]``: cos-then-sin features, then the MLP."""

    def __init__(self, channels: int, width: int):
        super().__init__(channels, width)
        self.channels = channels

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        half = self.channels // 2
        freqs = (1 / 10000) ** (torch.arange(half, dtype=torch.float32, device=c_noise.device) / half)
        angles = torch.outer(c_noise.float(), freqs)
        return super().forward(torch.cat([angles.cos(), angles.sin()], dim=1).to(self.fc1.weight.dtype))


class DiTBlock(nn.Module):
    """One pre-LN adaLN layer (no gates) with QK-LayerNorm, 2D RoPE and the UniBA block bias."""

    def __init__(self, cfg: InfDiTConfig):
        super().__init__()
        d = cfg.hidden
        self.ada = nn.Linear(d, 4 * d)
        self.qkv = nn.Linear(d, 3 * d)
        self.qk_norm = nn.LayerNorm(cfg.head_dim, eps=cfg.eps)
        self.block_bias = nn.Parameter(torch.zeros(4, cfg.heads, cfg.head_dim))
        self.attn_out = nn.Linear(d, d)
        self.fc1 = nn.Linear(d, cfg.mlp_ratio * d)
        self.fc2 = nn.Linear(cfg.mlp_ratio * d, d)


class LRCrossAttention(nn.Module):
    """Layer 0's nearby-LR cross-attention: each block's queries see the LR tokens of the 3x3
    LR blocks around it (zero tokens outside the image), with learned absolute positions."""

    def __init__(self, cfg: InfDiTConfig):
        super().__init__()
        d, h, hd = cfg.hidden, cfg.heads, cfg.head_dim
        self.proj_lr = nn.Conv2d(3, d, kernel_size=cfg.lr_patch, stride=cfg.lr_patch)
        self.query = nn.Linear(d, d)
        self.key_value = nn.Linear(d, 2 * d)
        self.dense = nn.Linear(d, d)
        self.post_norm = nn.LayerNorm(d, eps=cfg.eps)
        self.q_norm = nn.LayerNorm(hd, eps=cfg.eps)
        self.k_norm = nn.LayerNorm(hd, eps=cfg.eps)
        self.query_pos = nn.Parameter(torch.zeros(1, cfg.block_tokens, h, hd))
        self.key_pos = nn.Parameter(torch.zeros(1, cfg.lr_window_tokens, h, hd))
        self.heads = h

    def token_key_values(self, features: torch.Tensor) -> torch.Tensor:
        """LR tokens ``[..., hidden]`` (after ``proj_lr``) -> normalised keys and values ``[..., 2, H, d]``."""
        k, v = self.key_value(features).unflatten(-1, (2, self.heads, -1)).unbind(-3)
        return torch.stack([self.k_norm(k), v], dim=-3)

    def forward(self, c: torch.Tensor, window_kv: torch.Tensor) -> torch.Tensor:
        """``c`` ``[B, nr, nc, L, D]``; ``window_kv`` ``[B, nr, nc, W, 2, H, d]`` -> ``[B, nr, nc, L, D]``."""
        q = self.q_norm(self.query(c).unflatten(-1, (self.heads, -1))) + self.query_pos[0]
        k, v = window_kv.unbind(-3)
        return self.dense(block_attention(q, k + self.key_pos[0], v))


class FinalLayer(nn.Module):
    def __init__(self, cfg: InfDiTConfig):
        super().__init__()
        self.ada = nn.Linear(cfg.hidden, 2 * cfg.hidden)
        self.linear = nn.Linear(cfg.hidden, cfg.patch * cfg.patch * cfg.out_channels)


@dataclass
class Conditioning:
    """Per-evaluation modulation vectors: one ``[B, 4D]`` per layer and ``[B, 2D]`` for the output."""

    layers: list[torch.Tensor]
    final: torch.Tensor


class InfDiT(nn.Module):
    """The DiT of Inf-DiT (weights and per-token maths; evaluation order lives in :mod:`.schedule`)."""

    def __init__(self, cfg: InfDiTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(cfg.in_channels, cfg.hidden, kernel_size=cfg.patch, stride=cfg.patch)
        self.time_embed = TimestepEmbedding(cfg.time_channels, cfg.hidden)
        self.vector_embed = TwoLayerMLP(cfg.vector_dim, cfg.hidden)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.layers))
        self.lr_xattn = LRCrossAttention(cfg)
        self.final = FinalLayer(cfg)
        self.rope = RotaryTable(cfg.rope_period, cfg.head_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.weight.dtype

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.cfg.hidden,), eps=self.cfg.eps)

    def conditioning(self, c_noise: torch.Tensor, vector: torch.Tensor) -> Conditioning:
        """Time + CLIP-vector embedding, SiLU, then every adaLN head (which applies SiLU again)."""
        e = F.silu(self.time_embed(c_noise) + self.vector_embed(vector.to(self.dtype)))
        head_input = F.silu(e)
        return Conditioning([blk.ada(head_input) for blk in self.blocks], self.final.ada(head_input))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled network input ``[B, 6, h, w]`` (a whole number of blocks) -> block-layout tokens."""
        return to_blocks(self.patch_embed(x.to(self.dtype)), self.cfg.block)

    def layer(self, index: int, h: torch.Tensor, cond: Conditioning, cos: torch.Tensor, sin: torch.Tensor,
              neighbours: Neighbours, lr_window_kv: torch.Tensor | None = None) -> torch.Tensor:
        """One transformer layer on block-layout tokens ``[B, nr, nc, L, D]``."""
        cfg, blk = self.cfg, self.blocks[index]
        shift_msa, scale_msa, shift_mlp, scale_mlp = cond.layers[index].chunk(4, dim=-1)
        q, k, v = blk.qkv(modulate(self._norm(h), shift_msa, scale_msa)).unflatten(-1, (3, cfg.heads, -1)).unbind(-3)
        q = apply_rope(blk.qk_norm(q), cos, sin)
        k = apply_rope(blk.qk_norm(k), cos, sin)
        keys, values = neighbours(index, k, v)
        del k, v
        keys += blk.block_bias.repeat_interleave(cfg.block_tokens, dim=0)
        h = h + blk.attn_out(block_attention(q, keys, values))
        del q, keys, values
        if index == 0:
            if lr_window_kv is None:
                raise ValueError("layer 0 needs the LR cross-attention keys and values")
            h = h + self.lr_xattn(self._norm(h), lr_window_kv)
            m = self.lr_xattn.post_norm(h)
        else:
            m = self._norm(h)
        return h + blk.fc2(F.gelu(blk.fc1(modulate(m, shift_mlp, scale_mlp)), approximate="tanh"))

    def output(self, h: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Final layer (LayerNorm twice, modulation, Linear) and unpatchify -> ``[B, 3, h, w]``."""
        shift, scale = cond.final.chunk(2, dim=-1)
        tokens = self.final.linear(modulate(self._norm(self._norm(h)), shift, scale))
        return blocks_to_image(tokens, self.cfg.block, self.cfg.patch, self.cfg.out_channels)
