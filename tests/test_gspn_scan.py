"""The GSPN line scan: the PyTorch reference against a dense oracle, the Triton kernels against
the reference (forward and backward, Triton's interpreter on CPU), and the properties the
method relies on (row-stochastic weights, stability, independent chunks)."""

from __future__ import annotations

import pytest
import torch

from ultrares.kernels._gspn_reference import from_scan_frame, normalized_gates, scan_reference, to_scan_frame
from ultrares.kernels.gspn_scan import gspn_scan

# (N, H, W, C, chunk): W % chunk != 0 (a ragged last chunk, which the original CUDA backward gets
# wrong; reversed in directions 2 and 3), H = 1, H = 2, chunk = 1, chunk >= W, H != W.
SHAPES = [
    (2, 3, 5, 3, 2),
    (1, 1, 4, 2, 3),
    (1, 2, 5, 2, 4),
    (1, 3, 4, 2, 1),
    (2, 4, 3, 2, 8),
    (1, 5, 7, 3, None),
]
SHAPE_IDS = ["W%L!=0", "H=1", "H=2", "L=1", "L>=W", "global"]


def _inputs(n, h, w, c, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, w, c, generator=g, dtype=dtype)
    lam = torch.randn(n, h, w, c, generator=g, dtype=dtype)
    logits = 2 * torch.randn(n, h, w, 3, c, generator=g, dtype=dtype)
    return tuple(t.to(device) for t in (x, lam, logits))


def _dense_oracle(x, lam, logits, direction, chunk):
    """Explicit per-column tridiagonal matrices, one pixel column at a time."""
    xs, ls, gs = (to_scan_frame(t, direction) for t in (x, lam, logits))
    n, rows, steps, channels = xs.shape
    chunk = chunk or steps
    out = torch.zeros_like(xs)
    for b in range(n):
        for ch in range(channels):
            h = torch.zeros(rows, dtype=x.dtype)
            for s in range(steps):
                sig = torch.sigmoid(gs[b, :, s, :, ch])  # (rows, 3)
                m = torch.zeros(rows, rows, dtype=x.dtype)
                for r in range(rows):
                    neighbours = [(r + d, k) for k, d in enumerate((-1, 0, 1)) if 0 <= r + d < rows]
                    total = sum(sig[r, k] for _, k in neighbours)
                    for src, k in neighbours:
                        m[r, src] = sig[r, k] / total
                carried = m @ h if s % chunk else torch.zeros_like(h)
                h = carried + ls[b, :, s, ch] * xs[b, :, s, ch]
                out[b, :, s, ch] = h
    return from_scan_frame(out, direction)


@pytest.mark.parametrize("direction", range(4))
@pytest.mark.parametrize("shape", SHAPES[:3], ids=SHAPE_IDS[:3])
def test_reference_equals_dense_tridiagonal_recurrence(shape, direction):
    n, h, w, c, chunk = shape
    x, lam, logits = _inputs(n, h, w, c)
    steps = w if direction in (0, 2) else h
    expected = _dense_oracle(x, lam, logits, direction, chunk)
    torch.testing.assert_close(scan_reference(x, lam, logits, direction, min(chunk, steps)), expected)


@pytest.mark.parametrize("direction", range(4))
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_triton_forward_and_gradients_equal_the_reference(shape, direction, triton_device):
    n, h, w, c, chunk = shape
    inputs = [t.requires_grad_() for t in _inputs(n, h, w, c, device=triton_device)]
    out_ref = gspn_scan(*inputs, direction, chunk, backend="torch")
    grad = torch.randn_like(out_ref)
    grads_ref = torch.autograd.grad(out_ref, inputs, grad, materialize_grads=True)
    out_tri = gspn_scan(*inputs, direction, chunk, backend="triton")
    grads_tri = torch.autograd.grad(out_tri, inputs, grad)
    torch.testing.assert_close(out_tri, out_ref)
    for name, got, want in zip(("x", "lam", "logits"), grads_tri, grads_ref):
        torch.testing.assert_close(got, want, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("direction", [1, 2])
def test_triton_tiles_of_rows_and_channel_blocks_cover_the_map(direction, triton_device, monkeypatch):
    from ultrares.kernels import _gspn_plan

    monkeypatch.setattr(_gspn_plan, "TILE_ELEMENTS", 8)  # 2 channels x 4 rows per tile
    monkeypatch.setattr(_gspn_plan, "MAX_BLOCK_C", 2)
    # 2 images x 2 channel blocks x 3 chunks: every part of a program's id is used.
    inputs = [t.requires_grad_() for t in _inputs(2, 9, 7, 3, seed=5, device=triton_device)]
    out_ref = gspn_scan(*inputs, direction, 3, backend="torch")
    out_tri = gspn_scan(*inputs, direction, 3, backend="triton")
    torch.testing.assert_close(out_tri, out_ref)
    grad = torch.randn_like(out_ref)
    for got, want in zip(torch.autograd.grad(out_tri, inputs, grad), torch.autograd.grad(out_ref, inputs, grad)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("rows", [1, 2, 3, 6])
def test_normalized_weights_of_every_row_sum_to_one_including_the_edges(rows):
    # Large logits, but above -16: below it a single existing weight's sigmoid falls under the
    # 1e-7 clamp and its row sums to less than 1 (unseeded draws of 6 * randn hit that now and then).
    logits = 4 * torch.randn(2, rows, 4, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(rows))
    gates = normalized_gates(logits)
    torch.testing.assert_close(gates.sum(dim=-2), torch.ones(2, rows, 4, 5, dtype=torch.float64))
    assert torch.all(gates[:, 0, :, 0] == 0), "row 0 has no row above"
    assert torch.all(gates[:, -1, :, 2] == 0), "the last row has no row below"


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("direction", range(4))
def test_scan_is_stable_and_keeps_a_constant_column_constant(direction, backend, triton_device):
    n, h, w, c = 2, 5, 6, 3
    x, _, logits = _inputs(n, h, w, c, dtype=torch.float32, seed=1, device=triton_device)
    logits = 3 * logits  # far from uniform weights
    first = (slice(None), slice(None), 0) if direction == 0 else (slice(None), 0)
    if direction == 2:
        first = (slice(None), slice(None), w - 1)
    if direction == 3:
        first = (slice(None), h - 1)
    lam = torch.zeros_like(x)
    lam[first] = 1.0
    out = gspn_scan(torch.ones_like(x), lam, logits, direction, None, backend=backend)
    torch.testing.assert_close(out, torch.ones_like(out))
    out = gspn_scan(x, lam, logits, direction, None, backend=backend)
    peak = to_scan_frame(out, direction).abs().amax(dim=(0, 1, 3))
    assert torch.all(peak[1:] <= peak[:-1] + 1e-6), peak


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("direction", range(4))
def test_chunked_scan_equals_independent_scans_of_each_chunk(direction, backend, triton_device):
    n, h, w, c, chunk = 1, 5, 7, 2, 3
    x, lam, logits = _inputs(n, h, w, c, dtype=torch.float32, seed=2, device=triton_device)
    chunked = to_scan_frame(gspn_scan(x, lam, logits, direction, chunk, backend=backend), direction)
    frames = [to_scan_frame(t, direction) for t in (x, lam, logits)]
    for start in range(0, chunked.shape[2], chunk):
        piece = [f[:, :, start:start + chunk] for f in frames]
        alone = gspn_scan(*piece, 0, None, backend=backend)
        torch.testing.assert_close(chunked[:, :, start:start + chunk], alone)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_half_precision_inputs_are_accumulated_in_fp32(backend, triton_device):
    # A long global scan: a state kept in bf16 would drift far more than one rounding.
    x, lam, logits = (t.bfloat16() for t in _inputs(1, 4, 96, 8, dtype=torch.float32, seed=4, device=triton_device))
    want = scan_reference(x.double(), lam.double(), logits.double(), 0, 96)
    got = gspn_scan(x, lam, logits, 0, None, backend=backend)
    assert got.dtype == torch.bfloat16
    # Only the final rounding to bf16 differs from the fp64 scan of the same inputs.
    torch.testing.assert_close(got.double(), want, rtol=2**-7, atol=1e-5)


def test_auto_backend_on_cpu_tensors_is_the_reference_even_when_triton_interprets():
    x, lam, logits = _inputs(1, 3, 4, 2)
    torch.testing.assert_close(gspn_scan(x, lam, logits, 1, 2), scan_reference(x, lam, logits, 1, 2),
                               rtol=0, atol=0)


@pytest.mark.parametrize("change, message", [
    (dict(lam=torch.zeros(1, 3, 4, 3)), "lam must have x's shape"),
    (dict(logits=torch.zeros(1, 3, 4, 2, 2)), "logits must be"),
    (dict(direction=4), "direction must be 0..3"),
    (dict(chunk=0), "chunk must be >= 1"),
    (dict(x=torch.zeros(1, 3, 4, 2, dtype=torch.float64)), "share one floating dtype"),
])
def test_bad_arguments_are_refused_with_a_message(change, message):
    args = dict(x=torch.zeros(1, 3, 4, 2), lam=torch.zeros(1, 3, 4, 2), logits=torch.zeros(1, 3, 4, 3, 2),
                direction=0, chunk=2)
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        gspn_scan(**args)


def test_the_kernels_refuse_maps_whose_pixel_index_would_overflow_32_bits(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets meta tensors reach the launch, even on a GPU host
    x = torch.empty(1, 65536, 32768, 1, device="meta")  # 2**31 pixels, no memory
    logits = torch.empty(1, 65536, 32768, 3, 1, device="meta")
    with pytest.raises(ValueError, match="65536x32768 map has too many pixels"):
        gspn_scan(x, x, logits, 1, 4, backend="triton")
