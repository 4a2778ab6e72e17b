"""Inf-DiT's 2D rotary position embedding (pix2struct layout, interleaved pairs).

The first half of each head rotates with the token's row, the second half with its column;
within a half, dims (2m, 2m+1) form one rotation pair with frequency 10000^(-2m/half).
Angles are computed in fp32 exactly as the reference builds its table and then cast to the
compute dtype (the reference stores the table in the model dtype). Positions wrap at
``period`` tokens per axis, as in the reference sampler.
"""

from __future__ import annotations

import torch


def rope_frequencies(head_dim: int) -> torch.Tensor:
    """The ``head_dim / 4`` rotation frequencies of one axis (fp32)."""
    half = head_dim // 2
    return 1.0 / (10000 ** (torch.arange(0, half, 2)[: half // 2].float() / half))


def _axis_angles(positions: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    angles = positions.float()[..., None] * freqs
    return angles.repeat_interleave(2, dim=-1)


def rope_cos_sin(rows: torch.Tensor, cols: torch.Tensor, head_dim: int, period: int,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, ``[..., head_dim]``, for tokens at integer ``rows``/``cols`` (any shape)."""
    freqs = rope_frequencies(head_dim).to(rows.device)
    angles = torch.cat([_axis_angles(rows % period, freqs), _axis_angles(cols % period, freqs)], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_pairs(t: torch.Tensor) -> torch.Tensor:
    """``(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)``: adjacent dims form a pair."""
    pairs = t.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return t * cos + rotate_pairs(t) * sin
