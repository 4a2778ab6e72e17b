"""The Inf-DiT architecture as a handful of numbers, so small test models share the code path.

Every size is inferred from checkpoint shapes (:mod:`.checkpoint`); :data:`RELEASED` is the
published 754 M-parameter upsampler (28 layers, width 1280, 16 heads, 4-px patches,
128-px blocks, LR cross-attention over 3x3 LR blocks at 1/8 of the output resolution).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InfDiTConfig:
    """Sizes of one Inf-DiT network (defaults: the released model)."""

    hidden: int = 1280
    layers: int = 28
    heads: int = 16
    patch: int = 4
    block: int = 32
    """Tokens per side of one UniBA block (block * patch output pixels)."""
    lr_patch: int = 2
    """Pixels per side of one LR cross-attention token (``proj_lr`` kernel and stride)."""
    lr_block: int = 16
    """LR tokens per side of the LR block under one output block."""
    time_channels: int = 192
    vector_dim: int = 768
    in_channels: int = 6
    out_channels: int = 3
    mlp_ratio: int = 4
    rope_period: int = 1024
    """RoPE positions wrap every this many tokens per axis (the reference table size)."""
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden size {self.hidden} is not divisible by {self.heads} heads")
        if self.head_dim % 4:
            raise ValueError(f"head size {self.head_dim} must be divisible by 4 for the 2D rotary embedding")
        if (self.block * self.patch) % (self.lr_block * self.lr_patch):
            raise ValueError("an output block must cover a whole number of LR pixels per LR token")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def block_px(self) -> int:
        """Output pixels per side of one UniBA block (128 for the released model)."""
        return self.block * self.patch

    @property
    def block_tokens(self) -> int:
        return self.block * self.block

    @property
    def lr_scale(self) -> int:
        """Output pixels per LR cross-attention pixel (4: the cross-attention LR is output / 4)."""
        return self.block_px // (self.lr_block * self.lr_patch)

    @property
    def lr_window_tokens(self) -> int:
        """Keys of one block's LR cross-attention: the 3x3 LR blocks around it."""
        return (3 * self.lr_block) ** 2


RELEASED = InfDiTConfig()
