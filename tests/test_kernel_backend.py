"""How an op picks its PyTorch reference or its Triton kernel (kernels/backend.py)."""

from __future__ import annotations

import pytest
import torch

from ultrares.kernels import backend


def test_auto_uses_the_pytorch_path_for_cpu_tensors_even_when_triton_interprets():
    assert backend.resolve_backend("auto", torch.zeros(2)) == "torch"


def test_env_override_can_forbid_triton(monkeypatch):
    monkeypatch.setenv(backend.ENV_OVERRIDE, "torch")
    assert backend.resolve_backend("auto", torch.zeros(2)) == "torch"
    monkeypatch.setenv(backend.ENV_OVERRIDE, "cuda-please")
    with pytest.raises(ValueError, match=backend.ENV_OVERRIDE):
        backend.resolve_backend("auto", torch.zeros(2))


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown backend"):
        backend.resolve_backend("cutlass", torch.zeros(2))


def test_explicit_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine CPU tensors are never interpreted by choice")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        backend.resolve_backend("triton", torch.zeros(2))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.resolve_backend("triton", torch.zeros(2)) == "triton"


def test_triton_kernels_run_in_this_test_session(triton_device):
    # The suite's Triton tests rely on this: a kernel launches on CPU tensors (interpreter)
    # or on the GPU, and gives the PyTorch result.
    import triton
    import triton.language as tl

    @triton.jit
    def scaled_add(x_ptr, y_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        keep = offsets < n
        x = tl.load(x_ptr + offsets, mask=keep)
        y = tl.load(y_ptr + offsets, mask=keep)
        tl.store(out_ptr + offsets, x + alpha * y, mask=keep)

    x = torch.randn(1000, device=triton_device)
    y = torch.randn(1000, device=triton_device)
    out = torch.empty_like(x)
    scaled_add[(triton.cdiv(1000, 256),)](x, y, out, 1000, 0.5, BLOCK=256)
    torch.testing.assert_close(out, x + 0.5 * y)
