"""Choosing the backend that runs an op, by what each backend states it can run.

Every op in ``kernels/`` exposes one public function with a ``backend`` argument: ``"auto"``,
``"torch"`` or ``"triton"``. The op lists its backends in priority order (:class:`OpBackends`);
each one (:class:`BackendSpec`) states the devices it runs on, the CUDA compute capability and
the dtypes it needs, the shared memory one launch takes on that GPU (read from the compiled
kernel table, :mod:`.compiled_table`, so only builds checked for that architecture are used),
the largest head dimension it was built for, and whether it supports autograd. This is
comfy-kitchen's dispatch model.

- ``"auto"`` takes the first capable backend and never raises: the PyTorch path, last in every
  list, runs everything exactly. Why a backend was passed over is logged once per reason.
- An explicit backend that cannot run raises with the reason, so a caller that asked for a
  kernel never silently gets something else.
- Triton also runs on CPU tensors under ``TRITON_INTERPRET=1``; that is how the tests compare
  the backends without a GPU. An explicit ``"triton"`` then takes CPU tensors of the dtypes the
  spec lists as interpretable; ``"auto"`` keeps CPU tensors on the PyTorch path.
- The environment variable ``ULTRARES_BACKEND`` overrides ``"auto"`` (e.g. ``torch`` rules
  Triton out while debugging a kernel on a GPU).

How to declare an op (see ``kernels/clear_attention.py``)::

    MY_OP = OpBackends("my op", (BackendSpec("triton", devices=frozenset({"cuda"}), ...), TORCH))
    if resolve_backend(backend, *tensors, op=MY_OP) == "triton": ...
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["BACKENDS", "ENV_OVERRIDE", "GENERIC", "TORCH", "Backend", "BackendSpec", "DeviceInfo", "OpBackends",
           "custom_op_name", "device_info", "resolve_backend", "triton_can_run", "triton_importable",
           "triton_interpreting"]

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")
ENV_OVERRIDE = "ULTRARES_BACKEND"

logger = logging.getLogger("ultrares.kernels")


def custom_op_name(name: str) -> str:
    """``ultrares::<name>`` for a ``torch.library`` custom op, or a numbered variant when another
    copy of the pack (imported under another module name in the same process, as ComfyUI's loader
    and a test importing ``ultrares`` do) registered that name first: registering a name again
    would destroy the first copy's operator while that copy still calls it."""
    candidate, number = name, 1
    while hasattr(torch.ops.ultrares, candidate):
        number += 1
        candidate = f"{name}_{number}"
    return f"ultrares::{candidate}"


@functools.cache
def triton_importable() -> bool:
    """True when the ``triton`` package imports (it is optional: CPU-only hosts may lack it)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def triton_interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_can_run(*tensors: torch.Tensor) -> bool:
    """Whether a Triton kernel can take these tensors: CUDA tensors, or any under the interpreter."""
    if not triton_importable():
        return False
    if triton_interpreting():
        return True
    return all(t.is_cuda for t in tensors)


@dataclass(frozen=True)
class DeviceInfo:
    """What dispatch needs to know about a CUDA device."""

    capability: tuple[int, int]
    shared_memory: int  # bytes of shared memory one program may use (the opt-in maximum per block)

    @property
    def arch(self) -> int:
        """``sm_XY`` as the number XY, the key of the compiled table."""
        return self.capability[0] * 10 + self.capability[1]


@functools.cache
def _cuda_device_info(index: int) -> DeviceInfo:
    props = torch.cuda.get_device_properties(index)
    shared = getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block
    return DeviceInfo((props.major, props.minor), int(shared))


def device_info(device: torch.device) -> DeviceInfo:
    """Compute capability and shared memory of a CUDA device (asked once per device)."""
    return _cuda_device_info(device.index if device.index is not None else torch.cuda.current_device())


def _name(dtype: torch.dtype | None) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_names(dtypes: frozenset[torch.dtype]) -> str:
    return ", ".join(sorted(_name(d) for d in dtypes))


@dataclass(frozen=True)
class BackendSpec:
    """What one backend of one op can run.

    ``shared_memory(dtype, arch)`` gives the shared memory (bytes) of each launch configuration
    the compiled table holds for that dtype and ``sm_<arch>``; an empty tuple means no build was
    checked for that GPU, and the backend is not used there.
    """

    name: Literal["torch", "triton"]
    devices: frozenset[str] | None = None  # None: any device
    dtypes: frozenset[torch.dtype] | None = None  # None: any floating dtype
    min_capability: tuple[int, int] | None = None
    shared_memory: Callable[[torch.dtype, int], tuple[int, ...]] | None = None
    max_head_dim: int | None = None  # size of the last axis of the first tensor
    interpreted_dtypes: frozenset[torch.dtype] = frozenset()  # CPU tensors under TRITON_INTERPRET=1
    autograd: bool = True

    def refusal(self, tensors: Sequence[torch.Tensor], explicit: bool) -> str | None:
        """Why this backend cannot take these tensors, or None when it can."""
        if self.autograd is False and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return "it has no backward and an input requires grad"
        if self.max_head_dim is not None and tensors and tensors[0].shape[-1] > self.max_head_dim:
            return f"head dim {tensors[0].shape[-1]} > {self.max_head_dim}, the largest it was compiled for"
        if self.name == "triton":
            if not triton_importable():
                return "the triton package does not import"
            interpreted = explicit and triton_interpreting() and not any(t.is_cuda for t in tensors)
            if interpreted:
                dtype = tensors[0].dtype if tensors else None
                if dtype not in self.interpreted_dtypes:
                    return f"under TRITON_INTERPRET it takes {_dtype_names(self.interpreted_dtypes)}, not {_name(dtype)}"
                return None
        devices = sorted({t.device.type for t in tensors})
        if self.devices is not None and not set(devices) <= self.devices:
            hint = " (or TRITON_INTERPRET=1 for CPU tensors)" if self.name == "triton" else ""
            return f"it needs {'/'.join(sorted(self.devices))} tensors{hint}, got {'/'.join(devices)}"
        dtype = tensors[0].dtype if tensors else None
        if self.dtypes is not None and any(t.dtype not in self.dtypes for t in tensors):
            return f"it takes {_dtype_names(self.dtypes)}, not {_name(dtype)}"
        if not (tensors and tensors[0].is_cuda) or (self.min_capability is None and self.shared_memory is None):
            return None
        info = device_info(tensors[0].device)
        if self.min_capability is not None and info.capability < self.min_capability:
            major, minor = self.min_capability
            return f"it needs compute capability {major}.{minor}, the GPU has {info.capability[0]}.{info.capability[1]}"
        if self.shared_memory is not None:
            needed = self.shared_memory(dtype, info.arch)
            if not needed:
                return f"no build of it was compiled and checked for sm_{info.arch} in {_name(dtype)}"
            if min(needed) > info.shared_memory:
                return (f"its smallest launch needs {min(needed) // 1024} KiB of shared memory, "
                        f"sm_{info.arch} offers {info.shared_memory // 1024} KiB")
        return None


TORCH = BackendSpec("torch")  # the exact PyTorch path: any device, any dtype, differentiable


@dataclass(frozen=True)
class OpBackends:
    """An op's backends in priority order; the last should run everything (``TORCH``)."""

    op: str
    backends: tuple[BackendSpec, ...]

    def spec(self, name: str) -> BackendSpec:
        for spec in self.backends:
            if spec.name == name:
                return spec
        raise ValueError(f"{self.op} has no {name!r} backend; it has {[s.name for s in self.backends]}")


# Ops whose Triton kernel takes any CUDA tensor the op accepts (no tensor cores, small tiles).
GENERIC = OpBackends("op", (BackendSpec("triton", devices=frozenset({"cuda"}),
                                        interpreted_dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32,
                                                                      torch.float64})), TORCH))

_LOGGED: set[tuple[str, str, str]] = set()


def _log_once(op: str, skipped: str, reason: str, chosen: str) -> None:
    if (op, skipped, reason) in _LOGGED:
        return
    _LOGGED.add((op, skipped, reason))
    logger.info("%s: backend '%s' skipped (%s); running '%s'", op, skipped, reason, chosen)


def resolve_backend(requested: Backend, *tensors: torch.Tensor, op: OpBackends = GENERIC) -> Literal["torch", "triton"]:
    """The backend that will run ``op`` on these tensors (see the module docstring)."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; expected one of {BACKENDS}")
    if requested == "auto":
        requested = os.environ.get(ENV_OVERRIDE, "auto")  # type: ignore[assignment]
        if requested not in BACKENDS:
            raise ValueError(f"{ENV_OVERRIDE}={requested!r} is not one of {BACKENDS}")
    if requested != "auto":
        reason = op.spec(requested).refusal(tensors, explicit=True)
        if reason is not None:
            raise RuntimeError(f"backend={requested!r} cannot run {op.op} here: {reason}")
        return requested  # type: ignore[return-value]
    skipped = []
    for spec in op.backends:
        reason = spec.refusal(tensors, explicit=False)
        if reason is None:
            for name, why in skipped:
                _log_once(op.op, name, why, spec.name)
            return spec.name
        skipped.append((spec.name, reason))
    raise AssertionError(f"{op.op} lists no backend that runs everything: {skipped}")
