"""Measure peak tensor memory on the CPU, where ``torch.cuda`` memory statistics do not exist.

:class:`LiveTensorMeter` is a ``TorchDispatchMode``: it sees the output of every ATen op,
adds the byte size of each storage the first time an op allocates it (not views or in-place
results, whose storage an input already had), and subtracts it when the storage is freed (a
finalizer on the storage object). The peak is the largest live total
after any op. Not seen: memory a kernel allocates for itself and frees before returning
(e.g. the per-thread scratch of the fused CPU attention), and tensors that existed before
the meter started (add the weights yourself).

On a CPU-only machine the host and the "device" are the same memory. Code that keeps data
on the host (the Inf-DiT ``Placement``) allocates it, and does host-side preparation,
inside :meth:`host_work`; the meter then reports what a GPU would hold.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorMeter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}
        self._seen: set[int] = set()
        self._excluded: set[int] = set()
        self._paused = 0

    def _forget(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)
        self._seen.discard(key)
        self._excluded.discard(key)

    def _track(self, storage: torch.UntypedStorage) -> int:
        key = id(storage)
        if key not in self._seen:
            self._seen.add(key)
            weakref.finalize(storage, self._forget, key)
        return key

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        new = []
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = self._track(storage)
                if key not in self._live and key not in self._excluded:
                    new.append((key, storage.nbytes()))
        if new:
            # Host work, or a view of a tensor older than the meter: not an allocation here.
            inputs = set() if self._paused else {
                id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
            for key, nbytes in new:
                if self._paused or key in inputs:
                    self._excluded.add(key)
                else:
                    self._live[key] = nbytes
                    self.current += nbytes
            self.peak = max(self.peak, self.current)
        return out

    @contextlib.contextmanager
    def host_work(self) -> Iterator[None]:
        """Tensors created inside are host memory and never counted (also when used later)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1
