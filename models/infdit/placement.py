"""Where a block-scheduled evaluation keeps its tensors.

Compute always happens on ``device``. With ``offload``, everything whose size grows with the
image (the cached K/V strip, the LR cross-attention keys, the sampler's full-image buffers)
lives in host memory and only the slices a batch needs travel to the device, so device memory
stays flat as the image grows.

An optional :class:`HostObserver` wraps every host allocation made here and the host-side
preparation work; on a CPU-only machine, where host and device are the same memory, a memory
meter (the benchmarks' ``LiveTensorMeter``) uses it to tell the two apart.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager, Protocol

import torch

HOST = torch.device("cpu")


class HostObserver(Protocol):
    def host_work(self) -> ContextManager[None]: ...


@dataclass
class Placement:
    device: torch.device
    offload: bool = False
    observer: HostObserver | None = None

    def host_work(self) -> ContextManager[None]:
        """Wraps work done in host memory whatever the device (resizing, drawing noise)."""
        return self.observer.host_work() if self.observer is not None else contextlib.nullcontext()

    @property
    def store_device(self) -> torch.device:
        """Device of tensors that grow with the image: the host when offloading."""
        return HOST if self.offload else self.device

    def _empty_host(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        with self.host_work():
            return torch.empty(shape, dtype=dtype, device=HOST, pin_memory=self.device.type == "cuda")

    def empty_store(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised image-sized buffer on :attr:`store_device`."""
        if self.offload:
            return self._empty_host(shape, dtype)
        return torch.empty(shape, dtype=dtype, device=self.device)

    def to_store(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of ``t`` on :attr:`store_device` that owns its memory (never a view into ``t``)."""
        out = self.empty_store(tuple(t.shape), t.dtype)
        out.copy_(t)
        return out

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy of ``t`` (used for cache entries the next batch does not need).

        Asynchronous from a GPU (into pinned memory): such a copy is only ever read by later
        copies back to the device on the same stream, so the sweep need not wait for it.
        """
        out = self._empty_host(tuple(t.shape), t.dtype)
        out.copy_(t, non_blocking=True)
        return out

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the compute device: a view when it is already there, else a copy. Offloaded
        tensors are always copied, also when host and device are the same memory (CPU), so that
        a memory meter sees the copy a GPU would hold."""
        return t.to(self.device, non_blocking=True, copy=self.offload)
