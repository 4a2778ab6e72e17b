"""The GSPN op inside autograd and torch.compile: the Triton kernels are a ``torch.library``
custom op (fake implementation for tracing, Triton backward for autograd), so a compiled GSPN
layer gives the eager layer's outputs and gradients on either backend."""

from __future__ import annotations

import importlib

import pytest
import torch

from ultrares.kernels._gspn_reference import scan_reference
from ultrares.kernels.gspn_scan import gspn_scan
from ultrares.models.gspn import GSPNAttention

# The module (the package exports its function under the same name).
gspn_scan_module = importlib.import_module("ultrares.kernels.gspn_scan")


def _inputs(n, h, w, c, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, lam = (torch.randn(n, h, w, c, generator=g, dtype=dtype) for _ in range(2))
    return x, lam, 2 * torch.randn(n, h, w, 3, c, generator=g, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_triton_op_passes_torch_library_opcheck(dtype, triton_device):
    # Schema, fake tensors, the autograd registration and AOT dispatch, checked by PyTorch itself.
    x, lam, logits = (t.to(triton_device).requires_grad_() for t in _inputs(1, 3, 5, 2, dtype))
    for save_state in (False, True):
        torch.library.opcheck(gspn_scan_module._scan_op, (x, lam, logits, 1, 2, save_state))


def test_bf16_gradients_through_the_kernels_equal_the_reference_up_to_rounding(triton_device):
    # Training keeps the fp32 state for the backward pass, so only the outputs' rounding differs.
    inputs = [t.to(triton_device).requires_grad_() for t in _inputs(2, 6, 9, 5, torch.bfloat16, seed=3)]
    grad = torch.randn(2, 6, 9, 5, generator=torch.Generator().manual_seed(4)).to(triton_device, torch.bfloat16)
    want = torch.autograd.grad(gspn_scan(*inputs, 3, 4, backend="torch"), inputs, grad)
    got = torch.autograd.grad(gspn_scan(*inputs, 3, 4, backend="triton"), inputs, grad)
    for name, g, w in zip(("x", "lam", "logits"), got, want):
        torch.testing.assert_close(g, w, rtol=2 ** -7, atol=1e-3, msg=lambda m: f"d{name}: {m}")


def test_inference_stores_no_fp32_state(triton_device):
    x, lam, logits = (t.to(triton_device) for t in _inputs(1, 4, 6, 3, torch.bfloat16))
    h, state = gspn_scan_module._scan_op(x, lam, logits, 0, 6, False)
    assert h.dtype == torch.bfloat16 and state.numel() == 0
    torch.testing.assert_close(h, scan_reference(x, lam, logits, 0, 6))
    _, state = gspn_scan_module._scan_op(x, lam, logits, 0, 6, True)
    assert state.dtype == torch.float32 and state.shape == x.shape


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_compiled_gspn_layer_equals_the_eager_one_forward_and_backward(backend, triton_device):
    torch._dynamo.reset()
    layer = GSPNAttention(8, 2, chunk=3).to(triton_device)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 5 * 7, 8, generator=g).to(triton_device).requires_grad_() for _ in range(3))
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # fullgraph: no graph break
    want = layer(q, k, v, 5, 7, backend=backend)
    got = compiled(q, k, v, 5, 7, backend=backend)
    torch.testing.assert_close(got, want)
    grad = torch.randn_like(want)
    params = [q, k, v, *layer.parameters()]
    for g_got, g_want in zip(torch.autograd.grad(got, params, grad), torch.autograd.grad(want, params, grad)):
        torch.testing.assert_close(g_got, g_want)
