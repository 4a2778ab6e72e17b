"""How an op picks its PyTorch reference or its Triton kernel (kernels/backend.py)."""

from __future__ import annotations

import pytest
import torch

from ultrares.kernels import backend


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


class CudaStandIn:
    """What dispatch reads from a CUDA tensor (device, dtype, shape, requires_grad), on a machine
    without one."""

    def __init__(self, dtype: torch.dtype, head_dim: int = 128, requires_grad: bool = False):
        self.dtype, self.shape, self.requires_grad = dtype, torch.Size((1, 24, 4608, head_dim)), requires_grad
        self.device, self.is_cuda = torch.device("cuda", 0), True


def on_gpu(monkeypatch, capability: tuple[int, int], shared_kib: int) -> None:
    monkeypatch.setattr(backend, "device_info", lambda device: backend.DeviceInfo(capability, shared_kib * 1024))


GPUS = {"sm_75": ((7, 5), 64), "sm_80": ((8, 0), 163), "sm_86": ((8, 6), 99), "sm_87": ((8, 7), 163),
        "sm_89": ((8, 9), 99), "sm_90": ((9, 0), 227), "sm_120": ((12, 0), 99)}


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_clear_auto_runs_triton_only_where_a_checked_tensor_core_build_fits_and_never_raises(monkeypatch, gpu, dtype):
    from ultrares.kernels.clear_attention import CLEAR_BACKENDS

    on_gpu(monkeypatch, *GPUS[gpu])
    tensors = [CudaStandIn(dtype) for _ in range(3)]
    expected = "triton" if dtype != torch.float32 and gpu in ("sm_80", "sm_86", "sm_89", "sm_90") else "torch"
    assert backend.resolve_backend("auto", *tensors, op=CLEAR_BACKENDS) == expected
    if expected == "torch":  # asked for explicitly, the kernel is refused with the reason
        with pytest.raises(RuntimeError, match="cannot run CLEAR attention here: "):
            backend.resolve_backend("triton", *tensors, op=CLEAR_BACKENDS)


def test_clear_dispatch_reasons_are_logged_once(monkeypatch, caplog):
    from ultrares.kernels.clear_attention import CLEAR_BACKENDS

    on_gpu(monkeypatch, (8, 6), 99)
    monkeypatch.setattr(backend, "_LOGGED", set())
    with caplog.at_level("INFO", logger="ultrares.kernels"):
        for _ in range(3):
            backend.resolve_backend("auto", *[CudaStandIn(torch.float32)] * 3, op=CLEAR_BACKENDS)
    assert len(caplog.records) == 1
    assert "backend 'triton' skipped (it takes bfloat16, float16, not float32); running 'torch'" in caplog.text


@pytest.mark.parametrize("change, reason", [
    (dict(head_dim=256), "head dim 256 > 128"),
    (dict(shared_kib=40), "its smallest launch needs 48 KiB of shared memory, sm_86 offers 40 KiB"),
    (dict(capability=(8, 7)), "no build of it was compiled and checked for sm_87"),
    (dict(capability=(7, 5)), "compute capability 8.0"),
])
def test_clear_triton_is_refused_with_the_reason(monkeypatch, change, reason):
    from ultrares.kernels.clear_attention import CLEAR_BACKENDS

    on_gpu(monkeypatch, change.get("capability", (8, 6)), change.get("shared_kib", 99))
    tensors = [CudaStandIn(torch.bfloat16, change.get("head_dim", 128)) for _ in range(3)]
    assert backend.resolve_backend("auto", *tensors, op=CLEAR_BACKENDS) == "torch"
    with pytest.raises(RuntimeError, match=reason):
        backend.resolve_backend("triton", *tensors, op=CLEAR_BACKENDS)


def test_a_backend_without_autograd_is_skipped_when_an_input_requires_grad(monkeypatch):
    no_backward = backend.OpBackends("op", (backend.BackendSpec("triton", devices=frozenset({"cuda"}),
                                                                autograd=False), backend.TORCH))
    assert backend.resolve_backend("auto", CudaStandIn(torch.float16), op=no_backward) == "triton"
    assert backend.resolve_backend("auto", CudaStandIn(torch.float16, requires_grad=True), op=no_backward) == "torch"
    with torch.no_grad():
        assert backend.resolve_backend("auto", CudaStandIn(torch.float16, requires_grad=True), op=no_backward) == "triton"


def test_ops_without_stated_limits_send_every_cuda_tensor_to_triton():
    for dtype in (torch.float32, torch.float16):
        assert backend.resolve_backend("auto", CudaStandIn(dtype)) == "triton"
