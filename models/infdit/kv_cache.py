"""The per-layer neighbour K/V cache of one block-scheduled evaluation.

Keys are stored after the QK-LayerNorm and RoPE but before the block bias (which depends on
the segment a block is seen in), values as projected. Each entry is a copy that owns its
memory, so a cached block never keeps its whole batch alive. With offloading, entries the
next batch does not read wait in host memory and are copied straight into the key buffer of
the batch that reads them.
"""

from __future__ import annotations

import torch

from .network import Neighbours
from .schedule import Block, BlockBatch, CacheSchedule, Placement
from .attention import gather_segments


class NeighbourCache:
    def __init__(self, schedule: CacheSchedule, layers: int, placement: Placement):
        self.schedule = schedule
        self.placement = placement
        self._entries: list[dict[Block, tuple[torch.Tensor, torch.Tensor, bool]]] = [{} for _ in range(layers)]

    def device_entries(self) -> int:
        """Cached blocks currently on the device, summed over layers."""
        return sum(on_device for entries in self._entries for *_, on_device in entries.values())

    def host_entries(self) -> int:
        return sum(not on_device for entries in self._entries for *_, on_device in entries.values())

    def neighbours(self, index: int) -> Neighbours:
        """The gather callback for batch ``index``: extends its K/V with cached blocks, then
        stores the blocks later batches read and drops those this batch was the last to read."""
        batch = self.schedule.batches[index]
        keep_next = self.schedule.needed_next(index)

        def gather(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            entries = self._entries[layer]
            extended_k = self._extend(batch, k, entries, 0)
            extended_v = self._extend(batch, v, entries, 1)
            self._update(entries, index, batch, k, v, keep_next)
            keys = gather_segments(extended_k)
            del extended_k
            return keys, gather_segments(extended_v)

        return gather

    def _extend(self, batch: BlockBatch, own: torch.Tensor, entries: dict, which: int) -> torch.Tensor:
        rows, cols = own.shape[1:3]
        extended = own.new_empty((own.shape[0], rows + 1, cols + 1) + own.shape[3:])
        extended[:, 1:, 1:] = own
        for a, b in [(0, b) for b in range(cols + 1)] + [(a, 0) for a in range(1, rows + 1)]:
            i, j = batch.extended_source(a, b)
            if (i, j) in batch:
                extended[:, a, b] = own[:, i - batch.rows.start, j - batch.cols.start]
            else:
                extended[:, a, b].copy_(entries[(i, j)][which], non_blocking=True)
        return extended

    def _update(self, entries: dict, index: int, batch: BlockBatch, k: torch.Tensor, v: torch.Tensor,
                keep_next: set[Block]) -> None:
        """Drop, offload, then store: device memory only grows by what stays on the device."""
        for block in self.schedule.needs[index]:
            if self.schedule.last_use[block] == index:
                del entries[block]
        offload = self.placement.offload
        if offload:
            for block, (kb, vb, on_device) in list(entries.items()):
                if on_device and block not in keep_next:
                    entries[block] = (self.placement.to_host(kb), self.placement.to_host(vb), False)
        for i, j in self.schedule.stores[index]:
            kb, vb = k[:, i - batch.rows.start, j - batch.cols.start], v[:, i - batch.rows.start, j - batch.cols.start]
            if not offload or (i, j) in keep_next:
                entries[(i, j)] = (kb.clone(), vb.clone(), True)
            else:
                entries[(i, j)] = (self.placement.to_host(kb), self.placement.to_host(vb), False)
