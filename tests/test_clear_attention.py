"""Circular-window attention (kernels/clear_attention.py): the mask is CLEAR's rule, and the
tiled PyTorch path and the Triton kernel (interpreted on CPU) equal the dense masked reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import fresh_cache
from torch._subclasses.fake_tensor import FakeTensorMode

from ultrares.kernels import _clear_torch
from ultrares.kernels._clear_reference import dense_reference, window_mask
from ultrares.kernels._clear_tiles import Tile, tile_counts, visited_image_tiles
from ultrares.kernels import _clear_triton
from ultrares.kernels._clear_triton import Launch, window_attention_triton
from ultrares.kernels.clear_attention import circular_window_attention


def reference_local_mask(q_idx, kv_idx, text_length, width, window_size):
    """``local_mask`` of the reference repository (attention_processor.py), transcribed."""
    q_y, q_x = (q_idx - text_length) // width, (q_idx - text_length) % width
    kv_y, kv_x = (kv_idx - text_length) // width, (kv_idx - text_length) % width
    return (q_idx < text_length) | (kv_idx < text_length) | ((q_y - kv_y) ** 2 + (q_x - kv_x) ** 2 < window_size ** 2)


def reference_downsample_mask(q_idx, kv_idx, text_length, height, width, window_size):
    """``local_dwonsample_mask`` of the reference repository, transcribed."""
    q_y, q_x = (q_idx - text_length) // width, (q_idx - text_length) % width
    kv_y, kv_x = (kv_idx - text_length) // width, (kv_idx - text_length) % width
    image_end = text_length + height * width
    return ((q_idx < text_length) & (kv_idx < image_end)) | (
        (q_idx >= text_length) & ((kv_idx < text_length) | (kv_idx >= image_end)
                                  | ((q_y - kv_y) ** 2 + (q_x - kv_x) ** 2 < window_size ** 2)))


def qkv(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(3)]


def layout_inputs(batch, heads, dim, grid, n_txt, n_ref, n_down, dtype=torch.float32, seed=0):
    length = n_txt + grid[0] * grid[1] + n_ref
    q, k, v = qkv((batch, heads, length, dim), dtype, seed)
    down = qkv((batch, heads, n_down, dim), dtype, seed + 1)[:2] if n_down else (None, None)
    return q, k, v, down[0], down[1]


@pytest.mark.parametrize("grid, n_txt, radius", [((6, 9), 5, 3), ((7, 4), 3, 1), ((5, 5), 4, 8)])
def test_the_mask_is_the_reference_rule(grid, n_txt, radius):
    h, w = grid
    length = n_txt + h * w
    q_idx, kv_idx = torch.arange(length)[:, None], torch.arange(length)[None, :]
    assert torch.equal(window_mask(grid, radius, n_txt), reference_local_mask(q_idx, kv_idx, n_txt, w, radius))
    n_down = (h // 2) * (w // 2)
    kv_idx = torch.arange(length + n_down)[None, :]
    assert torch.equal(window_mask(grid, radius, n_txt, n_down=n_down),
                       reference_downsample_mask(q_idx, kv_idx, n_txt, h, w, radius))


def test_the_circle_is_strict_and_clipped_at_the_border():
    mask = window_mask((11, 11), 4, n_txt=0)
    center = mask[5 * 11 + 5].reshape(11, 11)
    assert not center[5, 9] and not center[1, 5]  # distance exactly 4: outside (strict)
    assert center[5, 8] and center[3, 2] and not center[2, 2]  # 3**2 + 2**2 < 16 <= 3**2 + 3**2
    assert int(center.sum()) == 7 * 7 - 4
    corner = mask[0].reshape(11, 11)  # query (0, 0): a quarter circle, not a window shifted inward
    assert int(corner.sum()) == 4 * 4 - 1 and not corner[0, 4] and not corner[3, 3]


def test_reference_tokens_are_global_and_only_image_queries_see_the_down_sampled_keys():
    grid, n_txt, n_ref, n_down = (4, 5), 3, 2, 4
    mask = window_mask(grid, 1, n_txt, n_ref, n_down)
    real = n_txt + 20 + n_ref
    ref_rows = slice(n_txt + 20, real)
    assert mask[:n_txt, :real].all() and mask[ref_rows, :real].all()
    assert not mask[:n_txt, real:].any() and not mask[ref_rows, real:].any()
    image_rows = mask[n_txt:n_txt + 20]
    assert image_rows[:, :n_txt].all() and image_rows[:, ref_rows].all() and image_rows[:, real:].all()
    assert torch.equal(image_rows[:, n_txt:n_txt + 20], torch.eye(20, dtype=torch.bool))  # radius 1: itself


CASES = [  # batch, heads, grid, n_txt, n_ref, n_down, radius
    (1, 2, (5, 7), 3, 0, 0, 2),
    (2, 3, (19, 23), 6, 0, 0, 3),  # several tiles, edge tiles shifted inward
    (2, 2, (17, 13), 4, 5, 12, 4),  # text, reference and down-sampled keys
    (1, 2, (9, 30), 0, 0, 0, 1),  # no global token, one-token windows
    (1, 1, (3, 4), 2, 0, 1, 9),  # the window holds the whole grid
    (1, 2, (1, 40), 2, 0, 0, 5),  # a single row
]


@pytest.mark.parametrize("batch, heads, grid, n_txt, n_ref, n_down, radius", CASES)
def test_the_tiled_pytorch_path_equals_the_dense_reference(batch, heads, grid, n_txt, n_ref, n_down, radius):
    q, k, v, dk, dv = layout_inputs(batch, heads, 16, grid, n_txt, n_ref, n_down)
    layout = dict(grid=grid, n_txt=n_txt, radius=radius, n_ref=n_ref, down_k=dk, down_v=dv, scale=0.3)
    out = circular_window_attention(q, k, v, backend="torch", **layout)
    torch.testing.assert_close(out, dense_reference(q, k, v, **layout), rtol=1e-5, atol=1e-5)


def test_the_tiled_pytorch_path_in_bfloat16_stays_within_bfloat16_error():
    q, k, v, dk, dv = layout_inputs(2, 2, 32, (18, 21), 5, 3, 20, dtype=torch.bfloat16)
    layout = dict(grid=(18, 21), n_txt=5, radius=5, n_ref=3, down_k=dk, down_v=dv)
    out = circular_window_attention(q, k, v, backend="torch", **layout)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), dense_reference(q.float(), k.float(), v.float(), **layout),
                               rtol=2e-2, atol=2e-2)


def test_the_pytorch_path_never_builds_a_full_size_score_matrix(monkeypatch):
    grid, n_txt = (48, 48), 8
    q, k, v, _, _ = layout_inputs(1, 1, 16, grid, n_txt, 0, 0)
    length = q.shape[2]
    largest = []
    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, **kwargs):
        largest.append(query.shape[0] * query.shape[2] * key.shape[2])
        return original(query, key, value, **kwargs)

    monkeypatch.setattr(_clear_torch.F, "scaled_dot_product_attention", sdpa)
    monkeypatch.setattr(_clear_torch, "KEY_COPY_BYTES", 64 * 1024)
    out = circular_window_attention(q, k, v, grid=grid, n_txt=n_txt, radius=4, backend="torch")
    monkeypatch.undo()
    torch.testing.assert_close(out, dense_reference(q, k, v, grid=grid, n_txt=n_txt, radius=4), rtol=1e-5, atol=1e-5)
    assert max(largest) < length * length / 20


def test_the_pytorch_path_checks_for_cancellation_between_tile_rows():
    q, k, v, _, _ = layout_inputs(1, 1, 16, (20, 20), 2, 0, 0)
    calls = []

    def cancel():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        circular_window_attention(q, k, v, grid=(20, 20), n_txt=2, radius=2, backend="torch", check_interrupt=cancel)
    assert len(calls) == 2


TRITON_CASES = [  # batch, heads, grid, n_txt, n_ref, n_down, radius, dtype
    (2, 2, (9, 11), 4, 0, 0, 3, torch.float32),
    (2, 2, (10, 7), 3, 2, 6, 2, torch.float32),  # text, reference and down-sampled keys; odd grid; batch 2
    (1, 1, (6, 9), 0, 0, 0, 1, torch.float32),  # nothing but the token itself
    (1, 2, (9, 11), 5, 0, 4, 4, torch.bfloat16),
]


@pytest.mark.parametrize("batch, heads, grid, n_txt, n_ref, n_down, radius, dtype", TRITON_CASES)
def test_the_triton_kernel_equals_the_dense_reference(triton_device, batch, heads, grid, n_txt, n_ref, n_down, radius,
                                                      dtype):
    q, k, v, dk, dv = [t if t is None else t.to(triton_device)
                       for t in layout_inputs(batch, heads, 16, grid, n_txt, n_ref, n_down, dtype)]
    layout = dict(grid=grid, n_txt=n_txt, radius=radius, n_ref=n_ref, down_k=dk, down_v=dv, scale=0.25)
    visits = torch.zeros(9 if grid == (9, 11) else 6, dtype=torch.int32, device=triton_device)
    out = window_attention_triton(q, k, v, launch=Launch(Tile(4, 4), Tile(4, 4), 4, 1), visits=visits, **layout)
    expected = dense_reference(*(t.float() for t in (q, k, v)), **{**layout, "down_k": None if dk is None else dk.float(),
                                                                 "down_v": None if dv is None else dv.float()})
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=tolerance, atol=tolerance)
    # the kernel visited exactly the image key tiles the counter predicts
    assert visits.cpu().tolist() == visited_image_tiles(grid, radius, Tile(4, 4), Tile(4, 4)).tolist()


def test_the_triton_kernel_skips_key_tiles_whose_closest_pair_lies_on_the_circle(triton_device):
    # 2x8 query tiles against one-column key tiles: the query tile (rows 12-13, columns 0-7) and
    # the key tile (row 16, column 11) are 3 rows and 4 columns apart, exactly on the radius-5
    # circle, so the strict rule skips that key tile.
    grid, radius, q_tile, k_tile = (17, 12), 5, Tile(2, 8), Tile(16, 1)
    q, k, v, _, _ = [t if t is None else t.to(triton_device) for t in layout_inputs(1, 1, 16, grid, 2, 0, 0)]
    layout = dict(grid=grid, n_txt=2, radius=radius, n_ref=0, down_k=None, down_v=None, scale=0.25)
    visits = torch.zeros(9 * 2, dtype=torch.int32, device=triton_device)
    out = window_attention_triton(q, k, v, launch=Launch(q_tile, k_tile, 4, 1), visits=visits, **layout)
    torch.testing.assert_close(out, dense_reference(q, k, v, **layout), rtol=1e-5, atol=1e-5)
    assert visits.cpu().tolist() == visited_image_tiles(grid, radius, q_tile, k_tile).tolist()


@pytest.mark.parametrize("launch", _clear_triton.LAUNCHES, ids=lambda launch: launch.name)
@pytest.mark.parametrize("grid, radius", [((13, 21), 5), ((9, 40), 1), ((6, 7), 30), ((20, 3), 9), ((11, 37), 2),
                                          ((17, 25), 10)])
def test_every_launch_visits_exactly_the_counted_tiles_and_equals_the_dense_reference(triton_device, launch, grid,
                                                                                       radius):
    # The kernel finds each row's span of key tiles itself (an integer square root per row);
    # the counter finds them by testing every tile: both must agree tile for tile in number, and
    # a wrong span would miss keys (output) or add tiles (count).
    q, k, v, dk, dv = [t.to(triton_device) for t in layout_inputs(1, 1, 16, grid, 3, 0, 2)]
    layout = dict(grid=grid, n_txt=3, radius=radius, n_ref=0, down_k=dk, down_v=dv, scale=0.25)
    visits = torch.zeros(math.prod(tile_counts(grid, launch.q_tile)), dtype=torch.int32, device=triton_device)
    out = window_attention_triton(q, k, v, launch=launch, visits=visits, **layout)
    torch.testing.assert_close(out, dense_reference(q, k, v, **layout), rtol=1e-5, atol=1e-5)
    assert visits.cpu().tolist() == visited_image_tiles(grid, radius, launch.q_tile, launch.k_tile).tolist()


ROW_CASES = [  # grid, n_txt, n_ref, n_down, radius, query rows
    ((13, 11), 3, 2, 6, 4, (4, 9)),  # an inner band; text, reference and down-sampled keys
    ((13, 11), 2, 0, 0, 3, (0, 3)),  # the top rows: circles clipped by the grid's edge
    ((13, 11), 2, 0, 0, 3, (12, 13)),  # the last row alone
    ((9, 7), 0, 0, 0, 1, (2, 7)),  # no global token, one-token windows
    ((5, 6), 2, 1, 3, 9, (1, 3)),  # the window holds the whole grid
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("grid, n_txt, n_ref, n_down, radius, rows", ROW_CASES)
def test_query_rows_alone_equal_those_rows_of_the_dense_reference(triton_device, backend, grid, n_txt, n_ref, n_down,
                                                                  radius, rows):
    device = triton_device if backend == "triton" else "cpu"
    q, k, v, dk, dv = [t if t is None else t.to(device)
                       for t in layout_inputs(2, 2, 16, grid, n_txt, n_ref, n_down)]
    layout = dict(grid=grid, n_txt=n_txt, radius=radius, n_ref=n_ref, down_k=dk, down_v=dv, scale=0.3)
    band = slice(n_txt + rows[0] * grid[1], n_txt + rows[1] * grid[1])
    expected = dense_reference(q, k, v, **layout)[:, :, band]
    torch.testing.assert_close(dense_reference(q[:, :, band], k, v, query_rows=rows, **layout), expected)
    out = circular_window_attention(q[:, :, band], k, v, query_rows=rows, backend=backend, **layout)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("launch", _clear_triton.LAUNCHES[-1:], ids=lambda launch: launch.name)
def test_query_rows_visit_only_the_key_tiles_their_own_windows_reach(triton_device, launch):
    grid, radius, rows = (29, 13), 4, (9, 22)  # 13 rows: the last query tile is clipped
    q, k, v, _, _ = [t if t is None else t.to(triton_device) for t in layout_inputs(1, 1, 16, grid, 2, 0, 0)]
    layout = dict(grid=grid, n_txt=2, radius=radius, n_ref=0, down_k=None, down_v=None, scale=0.25)
    band = slice(2 + rows[0] * grid[1], 2 + rows[1] * grid[1])
    counted = visited_image_tiles(grid, radius, launch.q_tile, launch.k_tile, query_rows=rows)
    visits = torch.zeros(counted.numel(), dtype=torch.int32, device=triton_device)
    out = window_attention_triton(q[:, :, band], k, v, launch=launch, visits=visits, query_rows=rows, **layout)
    torch.testing.assert_close(out, dense_reference(q, k, v, **layout)[:, :, band], rtol=1e-5, atol=1e-5)
    assert visits.cpu().tolist() == counted.tolist()
    assert counted.sum() < visited_image_tiles(grid, radius, launch.q_tile, launch.k_tile).sum()


def test_query_rows_are_differentiable_like_the_dense_reference():
    grid, rows = (11, 9), (3, 8)
    q, k, v, dk, dv = layout_inputs(1, 2, 8, grid, 3, 1, 4)
    band = slice(3 + rows[0] * grid[1], 3 + rows[1] * grid[1])
    inputs = [t.detach()[:, :, band].clone() if i == 0 else t.detach().clone() for i, t in enumerate((q, k, v, dk, dv))]
    for t in inputs:
        t.requires_grad_()
    layout = dict(grid=grid, n_txt=3, radius=3, n_ref=1, scale=0.4, query_rows=rows)
    grads = []
    for attention in (lambda *t: circular_window_attention(*t[:3], down_k=t[3], down_v=t[4], backend="torch", **layout),
                      lambda *t: dense_reference(*t[:3], down_k=t[3], down_v=t[4], **layout)):
        out = attention(*inputs)
        grads.append(torch.autograd.grad(out, inputs, torch.ones_like(out)))
    for mine, reference in zip(*grads):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows, q_rows, message", [((3, 3), 0, "not a range"), ((0, 12), 12, "not a range"),
                                                   ((1, 4), 2, "not the 27 image tokens")])
def test_query_rows_that_do_not_fit_the_grid_or_q_are_refused(rows, q_rows, message):
    q, k, v, _, _ = layout_inputs(1, 1, 8, (11, 9), 2, 0, 0)
    with pytest.raises(ValueError, match=message):
        circular_window_attention(q[:, :, :max(q_rows, 1) * 9], k, v, grid=(11, 9), n_txt=2, radius=2, query_rows=rows)


def test_the_public_op_runs_the_triton_kernel_with_its_default_tiles(triton_device):
    q, k, v, dk, dv = [t.to(triton_device) for t in layout_inputs(1, 1, 16, (9, 18), 2, 1, 3)]
    layout = dict(grid=(9, 18), n_txt=2, radius=5, n_ref=1, down_k=dk, down_v=dv)
    out = circular_window_attention(q, k, v, backend="triton", **layout)
    torch.testing.assert_close(out, dense_reference(q, k, v, **layout), rtol=1e-5, atol=1e-5)


def test_a_configuration_the_gpu_cannot_hold_gives_way_to_the_next_one(triton_device, monkeypatch):
    # float32 needs more shared memory than most GPUs have for the fastest tiles: Triton then
    # raises OutOfResources at launch, and the next configuration runs (and is kept).
    q, k, v = (t.to(triton_device) for t in layout_inputs(1, 1, 16, (9, 18), 2, 0, 0)[:3])
    layout = dict(grid=(9, 18), n_txt=2, radius=3, n_ref=0, down_k=None, down_v=None, scale=0.25)
    too_big = {_clear_triton.LAUNCHES[0], _clear_triton.LAUNCHES[1]}
    tried = []
    launch = _clear_triton._launch

    def limited(config, *args, **kwargs):
        tried.append(config)
        if config in too_big:
            raise _clear_triton.OutOfResources(256 * 1024, 100 * 1024, "shared memory")
        return launch(config, *args, **kwargs)

    monkeypatch.setattr(_clear_triton, "_launch", limited)
    monkeypatch.setattr(_clear_triton, "_FITTING", {})
    out = window_attention_triton(q, k, v, **layout)
    torch.testing.assert_close(out, dense_reference(q, k, v, **layout), rtol=1e-5, atol=1e-5)
    assert tried == list(_clear_triton.LAUNCHES)
    window_attention_triton(q, k, v, **layout)
    assert tried[3:] == [_clear_triton.LAUNCHES[2]]  # the fitting one is remembered
    too_big.add(_clear_triton.LAUNCHES[2])
    monkeypatch.setattr(_clear_triton, "_FITTING", {})
    with pytest.raises(RuntimeError, match="no configuration of the CLEAR Triton kernel fits.*backend='torch'"):
        window_attention_triton(q, k, v, **layout)


def test_a_call_the_kernel_cannot_take_runs_the_torch_path_under_auto_and_raises_when_triton_was_asked(
        triton_device, monkeypatch):
    from ultrares.kernels import clear_attention

    q, k, v = (t.to(triton_device) for t in layout_inputs(1, 1, 16, (6, 7), 2, 0, 0)[:3])
    layout = dict(grid=(6, 7), n_txt=2, radius=3)
    monkeypatch.setattr(_clear_triton, "MAX_GRID_SIDE", 6)  # a grid beyond the kernel's limit
    with pytest.raises(RuntimeError, match="grids up to 6 tokens a side.*backend='torch'"):
        circular_window_attention(q, k, v, backend="triton", **layout)
    # auto on a GPU would choose the kernel for these tensors; here it is made to
    monkeypatch.setattr(clear_attention, "resolve_backend", lambda *args, **kwargs: "triton")
    out = circular_window_attention(q, k, v, backend="auto", **layout)
    torch.testing.assert_close(out, dense_reference(q, k, v, **layout), rtol=1e-5, atol=1e-5)


def test_tiles_that_are_not_powers_of_two_are_refused(triton_device):
    q, k, v, _, _ = layout_inputs(1, 1, 16, (4, 6), 0, 0, 0)
    with pytest.raises(ValueError, match="powers of two"):
        window_attention_triton(q, k, v, grid=(4, 6), n_txt=0, radius=2, n_ref=0, down_k=None, down_v=None, scale=1.0,
                                launch=Launch(Tile(3, 8), Tile(8, 8), 4, 1))


@pytest.mark.parametrize("change, message", [
    (dict(n_txt=4), "sequence length"),
    (dict(radius=0), "radius must be >= 1"),
    (dict(down_k=torch.zeros(1, 2, 3, 16)), "go together"),
    (dict(down_k=torch.zeros(1, 2, 3, 8), down_v=torch.zeros(1, 2, 3, 8)), r"\[1, 2, M, 16\]"),
])
def test_bad_layouts_are_refused(change, message):
    q, k, v = qkv((1, 2, 3 + 20, 16))
    args = {**dict(grid=(4, 5), n_txt=3, radius=2), **change}
    with pytest.raises(ValueError, match=message):
        circular_window_attention(q, k, v, **args)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_views_of_a_fused_qkv_tensor_are_read_in_place(triton_device, backend):
    # ComfyUI's Flux hands over q/k/v as views of one [B, L, 3, H, D] projection.
    device = triton_device if backend == "triton" else "cpu"
    grid, n_txt = (6, 7), 3
    fused = torch.randn(2, n_txt + 42, 3, 2, 16, device=device)
    q, k, v = fused.permute(2, 0, 3, 1, 4)
    assert not v.is_contiguous()
    layout = dict(grid=grid, n_txt=n_txt, radius=3)
    out = circular_window_attention(q, k, v, backend=backend, **layout)
    expected = dense_reference(q.contiguous(), k.contiguous(), v.contiguous(), **layout)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def gradients(fn, inputs, seed=1):
    """Gradients of a fixed random projection of ``fn(*inputs)`` with respect to every input."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    present = [t for t in leaves if t is not None]
    return out, torch.autograd.grad((out.float() * weight.float()).sum(), present)


def assert_gradients_close(got, expected, rtol):
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g.float(), e.float(), rtol=rtol, atol=rtol * e.abs().max().item())


GRAD_CASES = CASES + [(2, 2, (9, 8), 3, 0, 0, 4)]  # the shape whose gradients used to raise (in-place buffers)


@pytest.mark.parametrize("batch, heads, grid, n_txt, n_ref, n_down, radius", GRAD_CASES)
def test_the_pytorch_path_is_differentiable_and_its_gradients_equal_the_dense_reference(batch, heads, grid, n_txt, n_ref,
                                                                                        n_down, radius):
    inputs = layout_inputs(batch, heads, 8, grid, n_txt, n_ref, n_down)
    layout = dict(grid=grid, n_txt=n_txt, radius=radius, n_ref=n_ref, scale=0.3)

    def dense(q, k, v, dk, dv):
        return dense_reference(q, k, v, down_k=dk, down_v=dv, **layout)

    def tiled(q, k, v, dk, dv):  # the path itself, differentiated by autograd
        return _clear_torch.window_attention_torch(q, k, v, down_k=dk, down_v=dv, **layout)

    def public(q, k, v, dk, dv):  # the op: its backward recomputes on the torch path
        return circular_window_attention(q, k, v, down_k=dk, down_v=dv, backend="torch", **layout)

    _, expected = gradients(dense, inputs)
    for fn in (tiled, public):
        out, got = gradients(fn, inputs)
        torch.testing.assert_close(out, dense(*inputs), rtol=1e-5, atol=1e-5)
        assert_gradients_close(got, expected, rtol=1e-5)


def test_bfloat16_gradients_stay_within_bfloat16_error_of_the_float32_reference():
    inputs = layout_inputs(2, 2, 16, (9, 8), 3, 2, 6, dtype=torch.bfloat16)
    layout = dict(grid=(9, 8), n_txt=3, radius=4, n_ref=2, scale=0.25)
    _, got = gradients(lambda q, k, v, dk, dv: circular_window_attention(q, k, v, down_k=dk, down_v=dv,
                                                                         backend="torch", **layout), inputs)
    _, expected = gradients(lambda q, k, v, dk, dv: dense_reference(q, k, v, down_k=dk, down_v=dv, **layout),
                            [t.float() for t in inputs])
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == torch.bfloat16
        assert (g.float() - e).norm() / e.norm() < 2e-2


def test_the_op_passes_an_fp64_gradcheck_with_text_reference_and_down_sampled_keys():
    q, k, v, dk, dv = [t.double().requires_grad_() for t in layout_inputs(2, 1, 4, (5, 6), 2, 1, 3)]
    layout = dict(grid=(5, 6), n_txt=2, radius=2, n_ref=1, backend="torch")
    assert torch.autograd.gradcheck(lambda *t: circular_window_attention(*t[:3], down_k=t[3], down_v=t[4], **layout),
                                    (q, k, v, dk, dv), fast_mode=True)


@pytest.mark.parametrize("batch, heads, grid, n_txt, n_ref, n_down, radius, dtype", TRITON_CASES[:2])
def test_gradients_through_the_triton_path_equal_the_dense_reference(triton_device, batch, heads, grid, n_txt, n_ref,
                                                                     n_down, radius, dtype):
    inputs = [None if t is None else t.to(triton_device)
              for t in layout_inputs(batch, heads, 16, grid, n_txt, n_ref, n_down, dtype)]
    layout = dict(grid=grid, n_txt=n_txt, radius=radius, n_ref=n_ref, scale=0.25)
    out, got = gradients(lambda q, k, v, dk, dv: circular_window_attention(q, k, v, down_k=dk, down_v=dv,
                                                                           backend="triton", **layout), inputs)
    ref_out, expected = gradients(lambda q, k, v, dk, dv: dense_reference(q, k, v, down_k=dk, down_v=dv, **layout),
                                  inputs)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert_gradients_close(got, expected, rtol=1e-5)


def test_the_kernel_function_alone_records_no_graph(triton_device):
    # Only the public op is differentiable; the kernel's own entry point must not hand out a
    # graph that would give the text rows gradients and the image rows none.
    q, k, v = (t.to(triton_device).requires_grad_() for t in layout_inputs(1, 1, 16, (4, 5), 2, 0, 0)[:3])
    out = window_attention_triton(q, k, v, grid=(4, 5), n_txt=2, radius=2, n_ref=0, down_k=None, down_v=None, scale=0.25)
    assert not out.requires_grad


@pytest.mark.parametrize("n_down, query_rows", [(0, None), (3, None), (3, [1, 4])])
def test_the_custom_op_and_its_fake_agree_under_opcheck(n_down, query_rows):
    # Schema, fake (meta) implementation, autograd registration and AOT dispatch, as torch.compile uses them.
    fused = torch.randn(2, 3 + 30, 3, 2, 8)
    q, k, v = fused.permute(2, 0, 3, 1, 4)  # strided views, as ComfyUI's Flux hands them over
    if query_rows is not None:
        q = q[:, :, 3 + query_rows[0] * 6:3 + query_rows[1] * 6]
    down = [t.requires_grad_() for t in qkv((2, 2, n_down, 8))[:2]] if n_down else [None, None]
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    layout = (5, 6, 3, 2, 0, 0.3, query_rows)
    torch.library.opcheck(torch.ops.ultrares.clear_window_attention.default, (q, k, v, *down, *layout, "torch"))
    # The backward op differentiates inside a functorch transform, which opcheck's schema and
    # cross-reference modes cannot look into: check its registration, then its fake by hand.
    backward = torch.ops.ultrares.clear_window_attention_backward.default
    args = (torch.randn(q.shape), q, k, v, *down, *layout)
    torch.library.opcheck(backward, args, test_utils=("test_autograd_registration",))
    with FakeTensorMode() as mode:
        fake = backward(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    real = backward(*args)
    assert [(t.shape, t.stride(), t.dtype) for t in fake] == [(t.shape, t.stride(), t.dtype) for t in real]


class ClearLayer(torch.nn.Module):
    """A projection followed by CLEAR attention: what a patched Flux block does per call."""

    def __init__(self, dim: int, heads: int, **layout):
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.heads, self.layout = heads, layout

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        down_k, down_v = k[:, :, -4:] * 0.5, v[:, :, -4:] * 0.5
        return circular_window_attention(q, k, v, down_k=down_k, down_v=down_v, **self.layout)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_a_compiled_module_traces_the_op_in_one_graph_and_matches_eager(compiler):
    torch.manual_seed(0)
    layer = ClearLayer(32, 2, grid=(6, 7), n_txt=3, radius=3, backend="torch")
    x = torch.randn(2, 3 + 42, 32)
    eager_out = layer(x)
    eager_grad = torch.autograd.grad(eager_out.square().sum(), layer.qkv.weight)[0]
    torch._dynamo.reset()
    with fresh_cache():  # compiled here and now, never a graph cached from another version of the op
        compiled = torch.compile(layer, backend=compiler, fullgraph=True)
        compiled_out = compiled(x)
        compiled_grad = torch.autograd.grad(compiled(x).square().sum(), layer.qkv.weight)[0]
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-5, atol=1e-5)
