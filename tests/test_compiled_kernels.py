"""The pack's Triton kernels as Triton's compiler builds them for real GPUs, with no GPU here
(kernels/aot.py): the committed table (kernels/compiled_kernels.json, which dispatch reads) is what
the compiler makes now, and every build keeps what it promises: it fits each architecture it is
offered on, its 16-bit dots run on tensor cores, it spills no more than its bound and its
pipelined loops prefetch with asynchronous copies.

The builds run in a separate process (under TRITON_INTERPRET=1 kernels cannot be compiled) and are
cached on disk (``ULTRARES_AOT_CACHE``, default ``~/.cache/ultrares/aot``): cold, the tests that
build (marker ``slow``) take a few minutes on two cores; cached, seconds. ``-m "not slow"`` leaves
them out; ``.ci/run`` runs them. The README prints the committed table, and must print it as it is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from ultrares.kernels import _clear_triton, aot, compiled_table

SIXTEEN_BIT = ("bfloat16", "float16")


@pytest.fixture(scope="module")
def fresh() -> list[dict]:
    """Reports of fresh builds of every declared kernel build, in declaration order."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "compiled_kernels.py"), "--json"],
                          env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-6000:]
    return json.loads(done.stdout)


def declared() -> list[tuple[aot.KernelBuild, int]]:
    return [(build, arch) for build in aot.all_builds() for arch in build.archs]


def row_of(rows: list[dict], build: aot.KernelBuild, arch: int) -> dict:
    dtype = str(build.dtype).removeprefix("torch.")
    (row,) = [r for r in rows if (r["kernel"], r["config"], r["dtype"], r["arch"]) == (build.kernel, build.config,
                                                                                        dtype, arch)]
    return row


@pytest.mark.slow
def test_every_declared_build_compiles_for_every_architecture_it_is_offered_on(fresh):
    assert len(fresh) == len(declared())
    for build, arch in declared():
        assert row_of(fresh, build, arch)["registers"] > 0


@pytest.mark.slow
def test_the_committed_table_is_what_the_compiler_makes_now(fresh):
    import triton

    assert compiled_table.triton_version() == triton.__version__, "regenerate: python scripts/compiled_kernels.py --write"
    assert compiled_table.rows() == fresh, "stale table: python scripts/compiled_kernels.py --write"


@pytest.mark.slow
@pytest.mark.parametrize("build, arch", declared(), ids=lambda x: x.kernel + "-" + x.config + "-" +
                         str(x.dtype).removeprefix("torch.") if isinstance(x, aot.KernelBuild) else f"sm_{x}")
def test_each_build_keeps_its_promises(fresh, build, arch):
    row = row_of(fresh, build, arch)
    assert row["shared"] <= aot.ARCH_SHARED_MEMORY[arch]
    if build.dots and row["dtype"] in SIXTEEN_BIT:
        assert row["tensor_cores"] == ("wgmma" if arch >= 90 else "mma")
    if build.max_spill_bytes is not None:
        assert max(row["spill_stores"], row["spill_loads"]) <= build.max_spill_bytes
    if build.num_stages > 1:
        assert all(n > 0 for n in row["async_copies"].values()), row["async_copies"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", _clear_triton.AOT_ARCHS)
@pytest.mark.parametrize("dtype", _clear_triton.GPU_DTYPES)
def test_clear_dispatch_starts_at_the_fast_pipelined_launch_on_every_architecture(fresh, dtype, arch):
    index = _clear_triton.first_fitting_launch(dtype, arch, aot.ARCH_SHARED_MEMORY[arch])
    assert index == 0
    launch = _clear_triton.LAUNCHES[index]
    build = next(b for b in aot.all_builds() if b.config == launch.name and b.dtype == dtype)
    row = row_of(fresh, build, arch)
    # the image key tiles' loads too are prefetched by asynchronous copies, not only the text keys'
    assert launch.num_stages > 1 and row["async_copies"]["_load_key_tile"] > 0 and row["async_copies"]["_attend_run"] > 0


def test_a_gpu_with_less_shared_memory_gets_the_next_launch_that_fits():
    fast = compiled_table.shared_memory(_clear_triton.KERNEL, torch.bfloat16, 86)
    smaller = _clear_triton.first_fitting_launch(torch.bfloat16, 86, fast[_clear_triton.LAUNCHES[0].name] - 1)
    assert smaller is not None and smaller > 0
    assert _clear_triton.first_fitting_launch(torch.bfloat16, 86, 1024) is None
    assert _clear_triton.first_fitting_launch(torch.bfloat16, 87, 10**9) is None  # never built for sm_87


@pytest.mark.slow
def test_float32_builds_run_on_fmas_and_spill_which_is_why_dispatch_keeps_float32_on_the_torch_path(fresh):
    rows = [r for r in fresh if r["kernel"] == _clear_triton.KERNEL and r["dtype"] == "float32"]
    assert rows
    for row in rows:
        assert row["tensor_cores"] == "none" and row["spill_stores"] > 10_000
    assert torch.float32 not in _clear_triton.GPU_DTYPES


README_BEGIN, README_END = "<!-- compiled-kernels:clear_window_fwd -->", "<!-- /compiled-kernels -->"


def test_the_readme_prints_the_committed_table():
    readme = (REPO_ROOT / "README.md").read_text()
    printed = readme.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip()
    assert printed == compiled_table.markdown(_clear_triton.KERNEL), "python scripts/compiled_kernels.py --readme"
