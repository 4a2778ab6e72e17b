"""Unidirectional Block Attention (UniBA): block layout and the key/value gather.

Tokens live in *block layout* ``[B, rows, cols, L, ...]`` (``L`` tokens of one block in
row-major order) from the patch embedding to the final layer, so attention never reshuffles
the image. A block's keys are four segments, in this order: itself, its top-left, left and
top neighbours. At the top and left image borders a missing neighbour is the clamped block
(block (0, 0) sees itself four times), exactly as the released "full" inference does.

The gather works on an *extended grid* ``[B, rows + 1, cols + 1, L, ...]`` whose first row
and column hold the neighbours above and to the left of the blocks being computed (from a
cache, or clamped copies at the image border). Whole-image and block-batched evaluation
differ only in where that extra row and column come from.
"""

from __future__ import annotations

import torch

SEGMENTS: tuple[str, ...] = ("self", "top-left", "left", "top")


def to_blocks(grid: torch.Tensor, block: int) -> torch.Tensor:
    """``[B, C, rows*block, cols*block]`` token grid -> block layout ``[B, rows, cols, L, C]``."""
    b, c, h, w = grid.shape
    blocks = grid.reshape(b, c, h // block, block, w // block, block).permute(0, 2, 4, 3, 5, 1)
    return blocks.reshape(b, h // block, w // block, block * block, c)


def blocks_to_image(tokens: torch.Tensor, block: int, patch: int, channels: int) -> torch.Tensor:
    """Unpatchify: block layout ``[B, rows, cols, L, patch*patch*channels]`` -> ``[B, C, H, W]``.

    Each token's values are ordered (py, px, c), as the reference's final linear layer.
    """
    b, rows, cols = tokens.shape[:3]
    t = tokens.reshape(b, rows, cols, block, block, patch, patch, channels)
    image = t.permute(0, 7, 1, 3, 5, 2, 4, 6)
    return image.reshape(b, channels, rows * block * patch, cols * block * patch)


def token_positions(rows: range, cols: range, block: int,
                    device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute token row and column of every token of blocks ``rows x cols``: ``[nr, nc, L]``."""
    inner = torch.arange(block, device=device)
    r = (torch.arange(rows.start, rows.stop, device=device)[:, None] * block + inner)
    c = (torch.arange(cols.start, cols.stop, device=device)[:, None] * block + inner)
    r = r[:, None, :, None].expand(-1, len(cols), -1, block)
    c = c[None, :, None, :].expand(len(rows), -1, block, -1)
    return r.reshape(len(rows), len(cols), -1), c.reshape(len(rows), len(cols), -1)


def gather_segments(extended: torch.Tensor) -> torch.Tensor:
    """Keys (or values) of every block: ``[B, nr+1, nc+1, L, ...] -> [B, nr, nc, 4L, ...]``.

    Segment order: self, top-left, left, top (the order the block bias was trained with).
    """
    return torch.cat([extended[:, 1:, 1:], extended[:, :-1, :-1], extended[:, 1:, :-1], extended[:, :-1, 1:]],
                     dim=3)
