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


def test_the_2d_kernel_counts_add_up():
    grid, radius = (40, 56), 6
    work = tiled_work(grid, radius, n_txt=20, n_ref=0, n_down=140, q_tile=Tile(8, 16), k_tile=Tile(8, 8),
                      side_block=32, block=16)
    q_tiles, k_tiles = 5 * 4, 5 * 7
    side = math.ceil(20 / 32) + math.ceil(140 / 32)
    image = int(visited_image_tiles(grid, radius, Tile(8, 16), Tile(8, 8)).sum())
    glob = math.ceil(20 / 16) * math.ceil((20 + 40 * 56) / 16)
    assert work.visited_tiles == q_tiles * side + image + glob
    assert work.total_tiles == q_tiles * (side + k_tiles) + glob
    assert work.computed_pairs == (q_tiles * side * 32 + image * 64) * 128 + glob * 16 * 16 >= work.allowed_pairs


def test_an_8k_flux_window_of_radius_16_holds_793_keys_and_3_tenths_of_a_percent_of_dense():
    # 8K image = 512 x 512 tokens, 512 text tokens: the research note's numbers
    assert sum(1 for y in range(-15, 16) for x in range(-15, 16) if x * x + y * y < 256) == 793
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
