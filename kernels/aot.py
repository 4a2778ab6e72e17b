"""Ahead-of-time builds of the pack's Triton kernels for real GPU targets, without a GPU.

Triton's interpreter, which the tests run the kernels in, hides everything the compiler decides.
This module compiles each kernel the way a launch on a GPU would (``triton.compile`` of an
``ASTSource`` for a ``GPUTarget``; the ptxas in Triton's wheel makes the cubin) and reads off what
the compiler did with it:

- ``shared``: shared memory per program (bytes, from the kernel metadata: a GPU whose per-block
  limit is smaller cannot launch it);
- ``registers``, ``spill_stores``, ``spill_loads``: per thread, from ptxas' verbose report;
- ``tensor_cores``: ``"wgmma"`` / ``"mma"`` when the dots became tensor-core instructions in the
  PTX, ``"none"`` when they became FMAs;
- ``async_copies``: for each helper named in :attr:`KernelBuild.pipelined`, the asynchronous copy
  instructions (``cp.async``, or TMA's ``cp.async.bulk``) the PTX attributes to that helper's source
  lines: a software-pipelined loop prefetches its loads with them, a loop that is not has none.

Arguments are specialised as Triton's launcher does (integers equal to 1 become constants,
multiples of 16 and pointers are marked 16-divisible), so a build is the one a launch with those
values would compile. Reports are cached on disk, keyed by the kernel's source hash (Triton's
``cache_key``, which covers the helpers it calls), the arguments, options, target, Triton version
and this module's source; ``ULTRARES_AOT_CACHE`` names the folder (default
``~/.cache/ultrares/aot``).

Run it in a process without ``TRITON_INTERPRET``: under the interpreter ``@triton.jit`` gives
functions that cannot be compiled. ``scripts/compiled_kernels.py`` does that and writes the
table ``kernels/compiled_kernels.json`` that dispatch reads; ``tests/test_compiled_kernels.py``
rebuilds it and checks it.

Adding a kernel: give its module a function ``aot_builds() -> list[KernelBuild]`` (one entry per
launch configuration and dtype, with the architectures it is offered on) and add the module's
name to :data:`BUILD_MODULES`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["ARCH_SHARED_MEMORY", "BUILD_MODULES", "KernelBuild", "all_builds", "build_report", "pointer"]

# Modules (relative to this package) with an ``aot_builds()`` function.
BUILD_MODULES: tuple[str, ...] = ("._clear_triton", "._gspn_triton")

# Shared memory one program (thread block) may use on each architecture, opt-in maximum, bytes
# (CUDA C++ Programming Guide, "Technical Specifications per Compute Capability").
ARCH_SHARED_MEMORY: dict[int, int] = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024,
                                      100: 227 * 1024, 120: 99 * 1024}

_POINTER_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64",
                  torch.int32: "*i32", torch.int64: "*i64"}
_HARNESS_KEY = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def pointer(dtype: torch.dtype) -> str:
    """The signature type of a pointer argument to a tensor of ``dtype`` (e.g. ``"*bf16"``)."""
    return _POINTER_TYPES[dtype]


@dataclass(frozen=True)
class KernelBuild:
    """One launch configuration of one kernel in one dtype, the architectures it is offered on,
    and what the build promises (the compiled-kernel test holds it to that).

    ``args`` holds one representative value per kernel parameter, by name: :func:`pointer` types
    for tensors, Python ints and floats for scalars, the constant for each ``tl.constexpr``.
    Promises: it fits the shared memory of every architecture in ``archs``
    (:data:`ARCH_SHARED_MEMORY`); with ``dots``, its 16-bit dots become tensor-core instructions
    (``wgmma`` on sm_90, ``mma`` before); its spills stay within ``max_spill_bytes`` per thread
    (None: no bound); with ``num_stages > 1``, the loads in each ``pipelined`` helper are
    asynchronous copies.
    """

    kernel: str  # the name in the compiled table
    config: str  # the launch configuration's name
    dtype: torch.dtype
    archs: tuple[int, ...]  # sm_XY as XY
    fn: object  # the @triton.jit kernel
    args: Mapping[str, object]
    num_warps: int
    num_stages: int
    pipelined: tuple[object, ...] = field(default=())  # @triton.jit helpers whose loads are reported
    dots: bool = False
    max_spill_bytes: int | None = None


def _specialise(build: KernelBuild) -> tuple[dict, dict, dict]:
    """Signature, constants and attributes as Triton's launcher derives them from the arguments."""
    signature, constants, attrs = {}, {}, {}
    missing = [p.name for p in build.fn.params if p.name not in build.args]
    if missing:
        raise ValueError(f"{build.kernel}: no value for {missing}")
    for i, param in enumerate(build.fn.params):
        value = build.args[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constants[param.name] = value
        elif isinstance(value, str):
            signature[param.name] = value
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        elif isinstance(value, int) and value == 1 and not param.do_not_specialize:
            signature[param.name] = "constexpr"
            constants[param.name] = 1
        elif isinstance(value, int):
            signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0 and not param.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"{build.kernel}: cannot specialise {param.name}={value!r}")
    return signature, constants, attrs


def _source_lines(helper: object) -> tuple[str, range]:
    lines, start = inspect.getsourcelines(helper.fn)
    return inspect.getsourcefile(helper.fn), range(start, start + len(lines))


def _async_copies(ptx: str, helpers: Iterable[object]) -> dict[str, int]:
    """Asynchronous copy instructions per helper, attributed through the PTX's ``.loc`` lines."""
    files = {int(i): os.path.realpath(path) for i, path in re.findall(r'^\s*\.file\s+(\d+)\s+"([^"]+)"', ptx, re.M)}
    where = {h.fn.__name__: _source_lines(h) for h in helpers}
    counts = dict.fromkeys(where, 0)
    loc = None
    for line in ptx.splitlines():
        m = re.match(r"\s*\.loc\s+(\d+)\s+(\d+)\s", line)
        if m:
            loc = (files.get(int(m.group(1))), int(m.group(2)))
            continue
        op = line.split(None, 1)[0] if line.strip() else ""
        if not op.startswith("cp.async") or "commit" in op or "wait" in op or loc is None:
            continue
        for name, (path, lines) in where.items():
            if loc[0] == os.path.realpath(path) and loc[1] in lines:
                counts[name] += 1
    return counts


def _tensor_cores(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"^\s*mma\.sync", ptx, re.M):
        return "mma"
    return "none"


def _ptxas_figures(log: str) -> dict[str, int]:
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if len(regs) != 1 or len(spills) != 1:
        raise RuntimeError(f"unexpected ptxas report (one kernel expected):\n{log}")
    return {"registers": int(regs[0]), "spill_stores": int(spills[0][0]), "spill_loads": int(spills[0][1])}


def _cache_dir() -> Path:
    if os.environ.get("ULTRARES_AOT_CACHE"):
        return Path(os.environ["ULTRARES_AOT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ultrares" / "aot"


def build_report(build: KernelBuild, arch: int) -> dict:
    """Compile ``build`` for ``sm_<arch>`` (or read the cached report) and say what the compiler did."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not hasattr(build.fn, "cache_key") or not hasattr(build.fn, "params"):
        raise RuntimeError("kernels are interpreted here (TRITON_INTERPRET is set): compile in a process without it")
    signature, constants, attrs = _specialise(build)
    key_text = json.dumps([triton.__version__, _HARNESS_KEY, build.fn.cache_key, signature, repr(sorted(constants.items())),
                           sorted(map(repr, attrs.items())), arch, build.num_warps, build.num_stages,
                           [h.cache_key for h in build.pipelined]])
    path = _cache_dir() / f"{build.kernel}-{hashlib.sha256(key_text.encode()).hexdigest()[:32]}.json"
    if path.exists():
        return json.loads(path.read_text())

    log = io.StringIO()
    with knobs.nvidia.scope(), knobs.cache.scope(), tempfile.TemporaryDirectory() as fresh:
        knobs.cache.dir = fresh  # a fresh Triton cache: ptxas runs, and its report is printed
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(build.fn, signature, constants, attrs),
                                      target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": build.num_warps, "num_stages": build.num_stages})
    ptx = compiled.asm["ptx"]
    report = {"kernel": build.kernel, "config": build.config, "dtype": str(build.dtype).removeprefix("torch."),
              "arch": arch, "shared": int(compiled.metadata.shared), **_ptxas_figures(log.getvalue()),
              "tensor_cores": _tensor_cores(ptx), "async_copies": _async_copies(ptx, build.pipelined)}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(report))
    partial.replace(path)
    return report


def all_builds() -> list[KernelBuild]:
    """Every build the kernel modules declare."""
    return [b for name in BUILD_MODULES for b in importlib.import_module(name, __package__).aot_builds()]
