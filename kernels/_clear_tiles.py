"""Tile geometry of circular-window attention: which key tiles a query tile must visit, and
exact work counts (allowed query/key pairs, tiles visited) for the benchmark and the tests.

Image tokens sit on an ``h x w`` grid. A 2D tile is a ``rows x cols`` rectangle of that grid
(clipped at the bottom/right edges). Query tile ``Q`` must visit key tile ``K`` iff some query
in ``Q`` and some key in ``K`` are closer than the radius: ``gap_y**2 + gap_x**2 < r**2``,
where ``gap`` is the distance between the two tiles' row (column) intervals, 0 if they
overlap. The closest pair of two full integer rectangles realises both gaps at once, so this
test is exact: a tile is skipped only if none of its keys is in any query's window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tile:
    """A ``rows x cols`` rectangle of image tokens; ``size`` tokens when not clipped."""

    rows: int
    cols: int

    @property
    def size(self) -> int:
        return self.rows * self.cols


def covering_radius(grid: tuple[int, int]) -> int:
    """The smallest radius whose window holds the whole grid: ``r**2 > (h-1)**2 + (w-1)**2``, the
    far corner inside the circle. From it on, every window attention on this grid is dense."""
    h, w = grid
    return math.isqrt((h - 1) ** 2 + (w - 1) ** 2) + 1


def tile_counts(grid: tuple[int, int], tile: Tile) -> tuple[int, int]:
    """Number of tiles along y and x that cover the grid (the last ones may be clipped)."""
    return math.ceil(grid[0] / tile.rows), math.ceil(grid[1] / tile.cols)


def _interval_gaps(length: int, q_step: int, k_step: int, q_range: tuple[int, int] | None = None) -> torch.Tensor:
    """``gaps[i, j]``: distance between query interval ``i`` and key interval ``j`` on one axis
    (query intervals tile ``q_range``, by default the whole axis)."""
    q_first, q_stop = q_range or (0, length)
    q_start = torch.arange(q_first, q_stop, q_step)
    q_end = torch.clamp(q_start + q_step, max=q_stop) - 1
    k_start = torch.arange(0, length, k_step)
    k_end = torch.clamp(k_start + k_step, max=length) - 1
    return torch.clamp(torch.maximum(k_start[None, :] - q_end[:, None], q_start[:, None] - k_end[None, :]), min=0)


def visited_image_tiles(grid: tuple[int, int], radius: int, q_tile: Tile, k_tile: Tile,
                        query_rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Per query tile (row-major over the tile grid): how many image key tiles it visits. With
    ``query_rows``, the query tiles cover only those grid rows (key tiles: the whole grid)."""
    gap_y = _interval_gaps(grid[0], q_tile.rows, k_tile.rows, query_rows) ** 2
    gap_x = _interval_gaps(grid[1], q_tile.cols, k_tile.cols) ** 2
    counts = torch.empty(gap_y.shape[0], gap_x.shape[0], dtype=torch.int64)
    for qy in range(gap_y.shape[0]):  # one tile row at a time keeps 16K grids small in memory
        hits = gap_y[qy][None, :, None] + gap_x[:, None, :] < radius * radius
        counts[qy] = hits.sum(dim=(1, 2))
    return counts.flatten()


def window_pairs(grid: tuple[int, int], radius: int) -> int:
    """Exact number of (image query, image key) pairs with ``dy**2 + dx**2 < radius**2``."""
    h, w = grid
    offsets = torch.arange(-(radius - 1), radius, dtype=torch.int64)
    inside = offsets[:, None] ** 2 + offsets[None, :] ** 2 < radius * radius
    rows = torch.clamp(h - offsets.abs(), min=0)
    cols = torch.clamp(w - offsets.abs(), min=0)
    return int((inside * rows[:, None] * cols[None, :]).sum())


@dataclass(frozen=True)
class WindowWork:
    """Work of one attention call per (batch, head): exact pairs and tile-level counts."""

    dense_pairs: int  # (n_txt + h*w + n_ref) ** 2: the original full attention
    allowed_pairs: int  # query/key pairs the CLEAR pattern lets through (exact FLOPs / (4*D))
    visited_tiles: int
    total_tiles: int
    computed_pairs: int  # visited tiles x tile area: the scores a block-sparse kernel computes


def allowed_pairs(grid: tuple[int, int], radius: int, n_txt: int, n_ref: int = 0, n_down: int = 0) -> int:
    """Exact allowed pairs: global rows see every real token; image rows see the global tokens,
    the down-sampled tokens and their window."""
    n_img = grid[0] * grid[1]
    n_glob = n_txt + n_ref
    return n_glob * (n_glob + n_img) + n_img * (n_glob + n_down) + window_pairs(grid, radius)


def tiled_work(grid: tuple[int, int], radius: int, n_txt: int, n_ref: int, n_down: int,
               q_tile: Tile, k_tile: Tile, side_block: int, block: int = 128) -> WindowWork:
    """Work of the pack's 2D-tiled kernel: image query tiles visit the global and down-sampled
    keys in ``side_block``-key steps and the image key tiles that reach their window; the global
    query rows run as dense ``block x block`` tiles over the real tokens."""
    n_img = grid[0] * grid[1]
    n_glob = n_txt + n_ref
    n_real = n_glob + n_img
    n_qt = math.prod(tile_counts(grid, q_tile))
    n_kt = math.prod(tile_counts(grid, k_tile))
    side_blocks = math.ceil(n_txt / side_block) + math.ceil(n_ref / side_block) + math.ceil(n_down / side_block)
    image_visits = int(visited_image_tiles(grid, radius, q_tile, k_tile).sum())
    glob_rows = math.ceil(n_glob / block) * math.ceil(n_real / block)
    visited = n_qt * side_blocks + image_visits
    total = n_qt * (side_blocks + n_kt)
    return WindowWork(
        dense_pairs=n_real * n_real,
        allowed_pairs=allowed_pairs(grid, radius, n_txt, n_ref, n_down),
        visited_tiles=visited + glob_rows,
        total_tiles=total + glob_rows,
        computed_pairs=(n_qt * side_blocks * side_block + image_visits * k_tile.size) * q_tile.size
        + glob_rows * block * block,
    )


def _raster_blocks(n_txt: int, grid: tuple[int, int], n_ref: int, length: int, block: int) -> dict[str, torch.Tensor]:
    """Describe each ``block``-token slice of the raster sequence ``[txt | img | ref | down]``:
    which kinds of tokens it holds and its image tokens as up to three grid rectangles."""
    h, w = grid
    n_img = h * w
    start = torch.arange(0, length, block)
    end = torch.clamp(start + block, max=length)  # exclusive
    img_a = torch.clamp(start, min=n_txt, max=n_txt + n_img) - n_txt
    img_b = torch.clamp(end, min=n_txt, max=n_txt + n_img) - n_txt  # exclusive, image-local
    has_img = img_b > img_a
    last = torch.clamp(img_b - 1, min=0)
    ya, xa, yb, xb = img_a // w, img_a % w, last // w, last % w
    one_row = ya == yb
    full = torch.full_like(ya, w - 1)
    zero = torch.zeros_like(ya)
    # rect 0: first (partial) row; rect 1: full rows in between; rect 2: last (partial) row
    y0 = torch.stack([ya, ya + 1, yb], dim=1)
    y1 = torch.stack([ya, yb - 1, yb], dim=1)
    x0 = torch.stack([xa, zero, torch.where(one_row, xa, zero)], dim=1)
    x1 = torch.stack([torch.where(one_row, xb, full), full, xb], dim=1)
    present = torch.stack([has_img, has_img & (yb > ya + 1), has_img & ~one_row], dim=1)
    n_real = n_txt + n_img + n_ref
    has_glob = (start < n_txt) | ((end > n_txt + n_img) & (start < n_real))
    has_down = end > n_real
    return dict(y0=y0, y1=y1, x0=x0, x1=x1, present=present, has_img=has_img, has_glob=has_glob,
                has_real=start < n_real, has_down=has_down)


def raster_work(grid: tuple[int, int], radius: int, n_txt: int, n_ref: int = 0, n_down: int = 0,
                block: int = 128) -> WindowWork:
    """Work of a block-sparse kernel on the raster token order with ``block x block`` blocks
    (FlexAttention's default, what the reference uses): a block is visited iff any of its
    query/key pairs is allowed."""
    n_real = n_txt + grid[0] * grid[1] + n_ref
    q = _raster_blocks(n_txt, grid, n_ref, n_real, block)
    k = _raster_blocks(n_txt, grid, n_ref, n_real + n_down, block)
    r2 = radius * radius
    visited = 0
    for i in range(q["y0"].shape[0]):
        gap_y = torch.clamp(torch.maximum(k["y0"][:, None, :] - q["y1"][i][:, None],
                                          q["y0"][i][:, None] - k["y1"][:, None, :]), min=0)
        gap_x = torch.clamp(torch.maximum(k["x0"][:, None, :] - q["x1"][i][:, None],
                                          q["x0"][i][:, None] - k["x1"][:, None, :]), min=0)
        both = q["present"][i][:, None] & k["present"][:, None, :]
        near = ((gap_y ** 2 + gap_x ** 2 < r2) & both).flatten(1).any(dim=1)
        hit = (q["has_glob"][i] & k["has_real"]) | (q["has_img"][i] & (k["has_glob"] | k["has_down"])) | near
        visited += int(hit.sum())
    total = q["y0"].shape[0] * k["y0"].shape[0]
    return WindowWork(
        dense_pairs=n_real * n_real,
        allowed_pairs=allowed_pairs(grid, radius, n_txt, n_ref, n_down),
        visited_tiles=visited,
        total_tiles=total,
        computed_pairs=visited * block * block,
    )
