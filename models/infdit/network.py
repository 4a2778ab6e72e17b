"""The Inf-DiT network in plain PyTorch, evaluated one rectangle of UniBA blocks at a time.

Each module holds its weights and its ``forward`` is the released model's maths (the order
of ``AdaLNMixin.layer_forward`` and ``FinalLayerMixin``). *Which* keys a block attends to
comes from a ``neighbours`` callback, so the same code evaluates the whole image
(:mod:`._full_reference`, the released clamp-and-concatenate gather) or an n x n batch of
blocks whose neighbours come from the cache (:mod:`.evaluate`, as :mod:`.schedule` plans).

Quirks of the released model that change numbers and are reproduced here:

- the keys are normalised with the *query* LayerNorm (the checkpoint's key LayerNorm is unused);
- SiLU is applied twice before every modulation Linear (once when the embedding is formed,
  once inside each adaLN head);
- the hidden state is layer-normalised twice before the final modulation;
- layer 0 adds the nearby-LR cross-attention and then uses its own affine LayerNorm before
  the MLP; every other LayerNorm of the trunk has no affine parameters;
- the MLP uses the tanh approximation of GELU.

Every Linear, Conv2d and LayerNorm is built from ``operations`` (default ``torch.nn``), as in
ComfyUI's own networks, so that ``comfy.ops`` (manual cast, fp8 weights, low-VRAM loading)
can be passed in by the nodes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from .attention import RotaryTable, apply_rope, block_attention, blocks_to_image, to_blocks
from .config import InfDiTConfig

Gather = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``(k, v) -> (keys, values)``: one layer's K/V of the blocks being computed (block layout) to
each block's ``[B, nr, nc, 4L, heads, head_dim]`` segments (self, top-left, left, top), before
the block bias."""
Neighbours = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``(layer, k, v) -> (keys, values)``: the :data:`Gather` of every layer."""
Operations = ModuleType | type
"""A namespace with ``Linear``, ``Conv2d`` and ``LayerNorm`` classes: ``torch.nn``, or one of
``comfy.ops`` (``disable_weight_init``, ``manual_cast`` ...)."""


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation with per-image ``[B, D]`` shift and scale on a block-layout tensor."""
    view = (shift.shape[0],) + (1,) * (x.dim() - 2) + (shift.shape[-1],)
    return x * (1 + scale.view(view)) + shift.view(view)


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine parameters over the last dimension (the trunk's norms)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


class TwoLayerMLP(nn.Module):
    """Linear -> SiLU -> Linear: the timestep and CLIP-vector embeddings."""

    def __init__(self, inputs: int, width: int, operations: Operations = nn):
        super().__init__()
        self.fc1 = operations.Linear(inputs, width)
        self.fc2 = operations.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


class TimestepEmbedding(TwoLayerMLP):
    """EDM noise level ``c_noise`` -> ``[B, hidden]``: cos-then-sin features, then the MLP."""

    def __init__(self, channels: int, width: int, operations: Operations = nn):
        super().__init__(channels, width, operations)
        self.channels = channels

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        half = self.channels // 2
        freqs = (1 / 10000) ** (torch.arange(half, dtype=torch.float32, device=c_noise.device) / half)
        angles = torch.outer(c_noise.float(), freqs)
        return super().forward(torch.cat([angles.cos(), angles.sin()], dim=1).to(self.fc1.weight.dtype))


class LRCrossAttention(nn.Module):
    """Layer 0's nearby-LR cross-attention: each block's queries see the LR tokens of the 3x3
    LR blocks around it (zero tokens outside the image), with learned absolute positions."""

    def __init__(self, cfg: InfDiTConfig, operations: Operations = nn):
        super().__init__()
        d, h, hd = cfg.hidden, cfg.heads, cfg.head_dim
        self.proj_lr = operations.Conv2d(3, d, kernel_size=cfg.lr_patch, stride=cfg.lr_patch)
        self.query = operations.Linear(d, d)
        self.key_value = operations.Linear(d, 2 * d)
        self.dense = operations.Linear(d, d)
        self.post_norm = operations.LayerNorm(d, eps=cfg.eps)
        self.q_norm = operations.LayerNorm(hd, eps=cfg.eps)
        self.k_norm = operations.LayerNorm(hd, eps=cfg.eps)
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


class DiTBlock(nn.Module):
    """One pre-LN adaLN layer (no gates) with QK-LayerNorm, 2D RoPE and the UniBA block bias."""

    def __init__(self, cfg: InfDiTConfig, operations: Operations = nn):
        super().__init__()
        d = cfg.hidden
        self.ada = operations.Linear(d, 4 * d)
        self.qkv = operations.Linear(d, 3 * d)
        self.qk_norm = operations.LayerNorm(cfg.head_dim, eps=cfg.eps)
        self.block_bias = nn.Parameter(torch.zeros(4, cfg.heads, cfg.head_dim))
        self.attn_out = operations.Linear(d, d)
        self.fc1 = operations.Linear(d, cfg.mlp_ratio * d)
        self.fc2 = operations.Linear(cfg.mlp_ratio * d, d)
        self.heads, self.block_tokens, self.eps = cfg.heads, cfg.block_tokens, cfg.eps

    def forward(self, h: torch.Tensor, modulation: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                gather: Gather, lr_attention: LRCrossAttention | None = None,
                lr_window_kv: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens ``h`` ``[B, nr, nc, L, D]`` and this layer's ``[B, 4D]`` modulation -> the layer's output::

            h = h + Attn(mod(LN(h), shift_msa, scale_msa))     over each block's UniBA keys
            h = h + CrossAttn(LN(h), LR);  m = post_norm(h)    layer 0 (``lr_attention`` given)
            m = LN(h)                                          every other layer
            h = h + MLP(mod(m, shift_mlp, scale_mlp))
        """
        shift_msa, scale_msa, shift_mlp, scale_mlp = modulation.chunk(4, dim=-1)
        h = h + self.attention(h, shift_msa, scale_msa, cos, sin, gather)
        if lr_attention is None:
            m = layer_norm(h, self.eps)
        else:
            h = h + lr_attention(layer_norm(h, self.eps), lr_window_kv)
            m = lr_attention.post_norm(h)
        return h + self.fc2(F.gelu(self.fc1(modulate(m, shift_mlp, scale_mlp)), approximate="tanh"))

    def attention(self, h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, gather: Gather) -> torch.Tensor:
        """``Attn(mod(LN(h), shift, scale))``: QK-LayerNorm, RoPE, the gathered keys plus their
        segment's bias, attention inside each block, output projection."""
        qkv = self.qkv(modulate(layer_norm(h, self.eps), shift, scale))
        q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).unbind(-3)
        del qkv
        q = apply_rope(self.qk_norm(q), cos, sin)
        k = apply_rope(self.qk_norm(k), cos, sin)  # the query LayerNorm, as released
        keys, values = gather(k, v)
        del k, v
        keys += self.block_bias.repeat_interleave(self.block_tokens, dim=0)
        return self.attn_out(block_attention(q, keys, values))


class FinalLayer(nn.Module):
    """The output head: ``F = unpatchify(Linear(mod(LN(LN(h)), shift, scale)))``."""

    def __init__(self, cfg: InfDiTConfig, operations: Operations = nn):
        super().__init__()
        self.ada = operations.Linear(cfg.hidden, 2 * cfg.hidden)
        self.linear = operations.Linear(cfg.hidden, cfg.patch * cfg.patch * cfg.out_channels)
        self.block, self.patch, self.channels, self.eps = cfg.block, cfg.patch, cfg.out_channels, cfg.eps

    def forward(self, h: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, nr, nc, L, D]`` and the ``[B, 2D]`` modulation -> pixels ``[B, 3, h, w]``.

        LayerNorm twice: SAT's ``final_layernorm``, then the head's own ``norm_final``.
        """
        shift, scale = modulation.chunk(2, dim=-1)
        tokens = self.linear(modulate(layer_norm(layer_norm(h, self.eps), self.eps), shift, scale))
        return blocks_to_image(tokens, self.block, self.patch, self.channels)


@dataclass
class Conditioning:
    """Per-evaluation modulation vectors: one ``[B, 4D]`` per layer and ``[B, 2D]`` for the output."""

    layers: list[torch.Tensor]
    final: torch.Tensor


class InfDiT(nn.Module):
    """The DiT of Inf-DiT, in the pieces an executor runs: the conditioning once per evaluation,
    then per rectangle of blocks the embedding, every layer and the output head."""

    def __init__(self, cfg: InfDiTConfig, operations: Operations = nn):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = operations.Conv2d(cfg.in_channels, cfg.hidden, kernel_size=cfg.patch, stride=cfg.patch)
        self.time_embed = TimestepEmbedding(cfg.time_channels, cfg.hidden, operations)
        self.vector_embed = TwoLayerMLP(cfg.vector_dim, cfg.hidden, operations)
        self.blocks = nn.ModuleList(DiTBlock(cfg, operations) for _ in range(cfg.layers))
        self.lr_xattn = LRCrossAttention(cfg, operations)
        self.final = FinalLayer(cfg, operations)
        self.rope = RotaryTable(cfg.rope_period, cfg.head_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.weight.dtype

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
        """Layer ``index`` on block-layout tokens ``[B, nr, nc, L, D]``; layer 0 is the one with
        the nearby-LR cross-attention, whose keys and values ``lr_window_kv`` it then needs."""
        gather = functools.partial(neighbours, index)
        if index > 0:
            return self.blocks[index](h, cond.layers[index], cos, sin, gather)
        if lr_window_kv is None:
            raise ValueError("layer 0 needs the LR cross-attention keys and values")
        return self.blocks[0](h, cond.layers[0], cos, sin, gather, self.lr_xattn, lr_window_kv)

    def output(self, h: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The output head -> ``[B, 3, h, w]``."""
        return self.final(h, cond.final)
