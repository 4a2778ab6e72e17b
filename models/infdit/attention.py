"""The attention maths of Inf-DiT's network: block layout, the UniBA key gather, 2D RoPE.

**Block layout.** Tokens live in *block layout* ``[B, rows, cols, L, ...]`` (``L`` tokens of
one block in row-major order) from the patch embedding to the final layer, so attention never
reshuffles the image.

**Unidirectional Block Attention (UniBA).** A block's keys are four segments, in this order:
itself, its top-left, left and top neighbours. At the top and left image borders a missing
neighbour is the clamped block (block (0, 0) sees itself four times), exactly as the released
"full" inference does. The gather works on an *extended grid* ``[B, rows + 1, cols + 1, L, ...]``
whose first row and column hold the neighbours above and to the left of the blocks being
computed (from a cache, or clamped copies at the image border). Whole-image and block-batched
evaluation differ only in where that extra row and column come from. Attention inside the
4L keys of a block is dense.

**2D rotary position embedding** (pix2struct layout, interleaved pairs). The first half of
each head rotates with the token's row, the second half with its column; within a half, dims
(2m, 2m+1) form one rotation pair with frequency 10000^(-2m/half). The reference looks cos and
sin up in ``[period, period, head_dim]`` tables (``freqs_cos``, ``freqs_sin``) that it builds in
fp32 and then casts with the model: the released checkpoint holds them in bf16, and those
stored values are what its attention uses, in every compute dtype. Entry ``[r, c]`` is the row
part at ``r`` followed by the column part at ``c``, so a table is given exactly by its diagonal
``[period, head_dim]``: :class:`RotaryTable` holds the diagonal of the checkpoint's tables
(their values, whatever arithmetic made them) and looks tokens up in it. Positions wrap at
``period`` tokens per axis, as in the reference sampler.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense attention inside each block: ``[B, nr, nc, L, H, d]`` queries -> ``[B, nr, nc, L, H*d]``."""
    lead = q.shape[:3]
    out = F.scaled_dot_product_attention(q.flatten(0, 2).transpose(1, 2), k.flatten(0, 2).transpose(1, 2),
                                         v.flatten(0, 2).transpose(1, 2))
    return out.transpose(1, 2).reshape(*lead, q.shape[3], -1)


CHECK_ROWS = 64
"""Table rows compared at a time by :func:`table_diagonal` (bounds its temporary memory)."""


def rope_frequencies(head_dim: int) -> torch.Tensor:
    """The ``head_dim / 4`` rotation frequencies of one axis (fp32)."""
    half = head_dim // 2
    return 1.0 / (10000 ** (torch.arange(0, half, 2)[: half // 2].float() / half))


def rope_table(period: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The diagonal ``[period, head_dim]`` of a freshly built table, as the reference builds it:
    fp32 positions ``arange(period) / period * period`` (not always whole numbers), fp32 angles."""
    positions = torch.arange(period) / period * period
    axis = (positions[:, None] * rope_frequencies(head_dim)).repeat_interleave(2, dim=-1)
    angles = torch.cat([axis, axis], dim=-1)
    return angles.cos(), angles.sin()


def table_diagonal(table: torch.Tensor) -> torch.Tensor:
    """The diagonal of a ``[period, period, head_dim]`` table that is exactly a row part and a
    column part (every table the reference builds is); ``ValueError`` otherwise."""
    if table.dim() != 3 or table.shape[0] != table.shape[1] or table.shape[2] % 4:
        raise ValueError(f"shape {tuple(table.shape)} is not [period, period, head_dim] with head_dim divisible by 4")
    index = torch.arange(table.shape[0])
    diagonal = table[index, index]
    half = table.shape[2] // 2
    for start in range(0, table.shape[0], CHECK_ROWS):
        rows, row_parts = table[start:start + CHECK_ROWS], diagonal[start:start + CHECK_ROWS, None, :half]
        if not (torch.equal(rows[..., :half], row_parts.expand_as(rows[..., :half]))
                and torch.equal(rows[..., half:], diagonal[None, :, half:].expand_as(rows[..., half:]))):
            raise ValueError("it is not a 2D rotary table: its entries do not depend on the row alone in the first "
                             "half of each head and on the column alone in the second half")
    return diagonal


def rotate_pairs(t: torch.Tensor) -> torch.Tensor:
    """``(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)``: adjacent dims form a pair."""
    pairs = t.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return t * cos + rotate_pairs(t) * sin


class RotaryTable(nn.Module):
    """The cos and sin table diagonals ``[period, head_dim]`` as buffers of the weights (loaded
    from the checkpoint and cast with the model, as the reference casts its tables), and the
    lookup. A new module holds a freshly built table, as a newly built reference model does."""

    def __init__(self, period: int, head_dim: int):
        super().__init__()
        cos, sin = rope_table(period, head_dim)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)

    @property
    def period(self) -> int:
        return self.cos.shape[0]

    def forward(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``[..., head_dim]`` (table dtype) for tokens at integer ``rows``/``cols`` (any shape)."""
        rows, cols, half = rows % self.period, cols % self.period, self.cos.shape[1] // 2
        return (torch.cat([self.cos[rows, :half], self.cos[cols, half:]], dim=-1),
                torch.cat([self.sin[rows, :half], self.sin[cols, half:]], dim=-1))
