"""CLEAR's down-sampled keys and values: every ``d x d`` cell of image tokens combined into one
token with a learned per-layer ``spatial_weight`` (initialised to the mean, ``1/d**2``).

The reference needs ``h`` and ``w`` divisible by ``d`` (and counts ``(h // d) * (w // d)``
down-sampled tokens). Here a grid that is not divisible keeps exactly those complete cells:
the last ``h % d`` rows and ``w % d`` columns feed no down-sampled token (they stay visible to
their neighbours through the window). Divisible grids give the reference's result.
"""

from __future__ import annotations

import torch


def mean_spatial_weight(factor: int) -> torch.Tensor:
    """The reference's initial ``spatial_weight``: every cell position weighs ``1/d**2``."""
    return torch.full((factor, factor), 1.0 / (factor * factor))


def down_sampled_count(grid: tuple[int, int], factor: int) -> int:
    """Number of down-sampled tokens: one per complete ``factor x factor`` cell."""
    return (grid[0] // factor) * (grid[1] // factor)


def down_sample(x: torch.Tensor, grid: tuple[int, int], n_txt: int, weight: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, D]`` keys or values (post-RoPE) -> ``[B, H, (h//d)*(w//d), D]`` cell tokens in
    row-major cell order; ``weight`` is ``[d, d]`` (row, column offset inside the cell).

    Computed in ``x``'s dtype like the reference (weighted products summed over the cell).
    """
    factor = weight.shape[0]
    if weight.shape != (factor, factor):
        raise ValueError(f"spatial_weight must be square, got {tuple(weight.shape)}")
    h, w = grid
    rows, cols = h // factor, w // factor
    image = x[:, :, n_txt:n_txt + h * w].unflatten(2, (h, w))[:, :, :rows * factor, :cols * factor]
    cells = image.unflatten(3, (cols, factor)).unflatten(2, (rows, factor))  # [B, H, rows, d, cols, d, D]
    weighted = cells * weight.to(x)[None, None, None, :, None, :, None]
    return weighted.sum(dim=(3, 5)).flatten(2, 3)
