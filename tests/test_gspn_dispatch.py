"""Which backend a GSPN scan gets on each GPU (kernels/gspn_scan.py: GSPN_BACKENDS): the Triton
kernels wherever the compiled-kernel table checked their builds, the PyTorch path elsewhere;
``auto`` never raises."""

from __future__ import annotations

import pytest
import torch

from test_kernel_backend import GPUS, CudaStandIn, on_gpu
from ultrares.kernels import backend
from ultrares.kernels.gspn_scan import GSPN_BACKENDS


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_gspn_auto_runs_triton_on_every_checked_architecture_and_never_raises(monkeypatch, gpu, dtype):
    on_gpu(monkeypatch, *GPUS[gpu])
    tensors = [CudaStandIn(dtype, requires_grad=True) for _ in range(3)]  # the kernels have a backward
    expected = "triton" if dtype != torch.float64 and gpu != "sm_87" else "torch"  # sm_87 (Jetson): never built
    assert backend.resolve_backend("auto", *tensors, op=GSPN_BACKENDS) == expected
    if expected == "torch":
        with pytest.raises(RuntimeError, match="cannot run GSPN scan here: "):
            backend.resolve_backend("triton", *tensors, op=GSPN_BACKENDS)


def test_gspn_needs_room_for_its_largest_build(monkeypatch):
    from ultrares.kernels import compiled_table

    largest = max(v for k in ("gspn_scan_fwd", "gspn_scan_bwd")
                  for v in compiled_table.shared_memory(k, torch.float32, 86).values())
    on_gpu(monkeypatch, (8, 6), largest // 1024 - 1)
    tensors = [CudaStandIn(torch.float32) for _ in range(3)]
    assert backend.resolve_backend("auto", *tensors, op=GSPN_BACKENDS) == "torch"
    with pytest.raises(RuntimeError, match=f"needs {largest // 1024} KiB of shared memory"):
        backend.resolve_backend("triton", *tensors, op=GSPN_BACKENDS)


@pytest.mark.parametrize("kernel", ["gspn_scan_fwd", "gspn_scan_bwd"])
def test_the_readme_prints_the_committed_gspn_builds(kernel):
    from conftest import REPO_ROOT
    from ultrares.kernels import compiled_table

    readme = (REPO_ROOT / "README.md").read_text()
    printed = readme.split(f"<!-- compiled-kernels:{kernel} -->", 1)[1].split("<!-- /compiled-kernels -->", 1)[0]
    assert printed.strip() == compiled_table.markdown(kernel), "python scripts/compiled_kernels.py --readme"
