"""Work counts of circular-window attention (kernels/_clear_tiles.py): exact pair counts, and
tile counts that equal a brute-force search over the dense mask."""

from __future__ import annotations

import math

import pytest
import torch

from ultrares.kernels._clear_reference import window_mask
from ultrares.kernels._clear_tiles import (Tile, allowed_pairs, covering_radius, raster_work, tile_counts, tiled_work,
                                           visited_image_tiles, window_pairs)


def tile_members(grid: tuple[int, int], tile: Tile) -> list[torch.Tensor]:
    """Image-local token indices of each 2D tile, row-major over the tile grid."""
    h, w = grid
    ty, tx = tile_counts(grid, tile)
    index = torch.arange(h * w).reshape(h, w)
    return [index[y * tile.rows:(y + 1) * tile.rows, x * tile.cols:(x + 1) * tile.cols].flatten()
            for y in range(ty) for x in range(tx)]


@pytest.mark.parametrize("grid, radius, q_tile, k_tile", [
    ((13, 17), 3, Tile(4, 4), Tile(4, 4)),
    ((20, 9), 5, Tile(8, 16), Tile(8, 8)),
    ((7, 7), 1, Tile(2, 4), Tile(4, 2)),
    ((16, 16), 40, Tile(4, 8), Tile(8, 4)),
])
def test_a_key_tile_is_visited_exactly_when_one_of_its_pairs_is_in_a_window(grid, radius, q_tile, k_tile):
    image = window_mask(grid, radius, n_txt=0)
    expected = [sum(bool(image[qs][:, ks].any()) for ks in tile_members(grid, k_tile))
                for qs in tile_members(grid, q_tile)]
    assert visited_image_tiles(grid, radius, q_tile, k_tile).tolist() == expected


@pytest.mark.parametrize("grid", [(1, 1), (1, 9), (7, 8), (6, 6), (13, 4)])
def test_the_covering_radius_is_the_smallest_whose_windows_hold_the_whole_grid(grid):
    n_img = grid[0] * grid[1]
    dense = [bool(window_mask(grid, r, n_txt=0)[:n_img, :n_img].all()) for r in range(1, sum(grid) + 1)]
    assert dense.index(True) + 1 == covering_radius(grid)


@pytest.mark.parametrize("grid, radius, n_txt, n_ref, n_down", [
    ((9, 14), 4, 5, 0, 0), ((10, 10), 2, 3, 6, 25), ((5, 31), 7, 0, 2, 7), ((6, 6), 20, 4, 0, 9)])
def test_pair_counts_equal_the_dense_mask(grid, radius, n_txt, n_ref, n_down):
    mask = window_mask(grid, radius, n_txt, n_ref, n_down)
    assert allowed_pairs(grid, radius, n_txt, n_ref, n_down) == int(mask.sum())
    image = slice(n_txt, n_txt + grid[0] * grid[1])
    assert window_pairs(grid, radius) == int(mask[image, image].sum())


@pytest.mark.parametrize("grid, radius, n_txt, n_ref, n_down, block", [
    ((9, 14), 4, 5, 0, 0, 16), ((10, 10), 2, 16, 6, 25, 16), ((12, 30), 3, 7, 3, 12, 8), ((4, 40), 2, 0, 0, 0, 32)])
def test_raster_block_counts_equal_a_brute_force_over_the_dense_mask(grid, radius, n_txt, n_ref, n_down, block):
    mask = window_mask(grid, radius, n_txt, n_ref, n_down)
    rows, cols = math.ceil(mask.shape[0] / block), math.ceil(mask.shape[1] / block)
    expected = sum(bool(mask[i * block:(i + 1) * block, j * block:(j + 1) * block].any())
                   for i in range(rows) for j in range(cols))
    work = raster_work(grid, radius, n_txt, n_ref, n_down, block=block)
    assert (work.visited_tiles, work.total_tiles) == (expected, rows * cols)
    assert work.computed_pairs == expected * block * block >= work.allowed_pairs


def brute_force_tiled_work(grid, radius, n_txt, n_ref, n_down, q_tile, k_tile, side_block, block):
    """(visited tiles, all tiles, computed pairs) of the 2D-tiled kernel, counted on the dense mask:
    image query tiles against text, reference and down-sampled key blocks of ``side_block`` and
    against image key tiles; the global query rows (text, then reference) against ``block``-wide
    blocks of the real tokens. A tile is visited when any of its pairs is allowed; a visited tile
    computes its full area."""
    mask = window_mask(grid, radius, n_txt, n_ref, n_down)
    n_img = grid[0] * grid[1]
    n_real = n_txt + n_img + n_ref
    image = [n_txt + members for members in tile_members(grid, q_tile)]
    blocks = lambda start, stop, size: [torch.arange(a, min(a + size, stop)) for a in range(start, stop, size)]  # noqa: E731
    side = (blocks(0, n_txt, side_block) + blocks(n_txt + n_img, n_real, side_block)
            + blocks(n_real, n_real + n_down, side_block))
    keys = [(keys, side_block) for keys in side] + [(n_txt + k, k_tile.size) for k in tile_members(grid, k_tile)]
    global_rows = torch.cat([torch.arange(n_txt), torch.arange(n_txt + n_img, n_real)])
    rows = [global_rows[i:i + block] for i in range(0, len(global_rows), block)]
    visited = total = computed = 0
    for queries, q_size, key_groups in [(q, q_tile.size, keys) for q in image] + [
            (r, block, [(k, block) for k in blocks(0, n_real, block)]) for r in rows]:
        for key_group, k_size in key_groups:
            total += 1
            if mask[queries][:, key_group].any():
                visited += 1
                computed += q_size * k_size
    return visited, total, computed


@pytest.mark.parametrize("grid, radius, n_txt, n_ref, n_down, side_block, block", [
    ((24, 40), 6, 20, 0, 60, 32, 16), ((13, 9), 3, 7, 5, 12, 4, 8), ((8, 24), 30, 3, 0, 0, 8, 16)])
def test_the_2d_kernel_counts_equal_a_brute_force_over_the_dense_mask(grid, radius, n_txt, n_ref, n_down, side_block,
                                                                      block):
    work = tiled_work(grid, radius, n_txt, n_ref, n_down, Tile(8, 16), Tile(8, 8), side_block, block)
    visited, total, computed = brute_force_tiled_work(grid, radius, n_txt, n_ref, n_down, Tile(8, 16), Tile(8, 8),
                                                      side_block, block)
    assert (work.visited_tiles, work.total_tiles, work.computed_pairs) == (visited, total, computed)
    assert work.computed_pairs >= work.allowed_pairs


def test_an_8k_flux_window_of_radius_16_holds_793_keys_and_3_tenths_of_a_percent_of_dense():
    # 8K image = 512 x 512 tokens, 512 text tokens: the research note's numbers. A query in the
    # middle of a 31 x 31 grid keeps its whole window: 793 keys.
    assert int(window_mask((31, 31), 16, n_txt=0)[15 * 31 + 15].sum()) == 793
    assert window_pairs((1, 1), 16) == 1 and window_pairs((31, 31), 16) < 31 * 31 * 793
    grid = (512, 512)
    share = window_pairs(grid, 16) / (512 * 512) ** 2
    assert 0.0029 < share < 0.0031


def test_the_benchmark_prints_the_counted_work_of_the_kernel_against_raster_blocks(capsys):
    import importlib

    from ultrares.benchmarks import BENCHMARKS

    bench = importlib.import_module(BENCHMARKS["clear"], "ultrares.benchmarks")
    bench.work_table(["1K"])
    rows = {line.split(" | ")[1]: line for line in capsys.readouterr().out.splitlines() if line.startswith("| 1K |")}
    grid = (64, 64)
    tiled = tiled_work(grid, 16, 512, 0, 0, Tile(8, 16), Tile(8, 8), 64)
    raster = raster_work(grid, 16, 512)
    assert f"{tiled.visited_tiles}/{tiled.total_tiles}" in rows["clear_local_16"]
    assert f"{raster.visited_tiles}/{raster.total_tiles}" in rows["clear_local_16"]
    assert rows["clear_local_16"].endswith(f"| {raster.computed_pairs / tiled.computed_pairs:.2f}x |")
