"""One network evaluation D(x; sigma) over the whole image, one block batch at a time.

A batch runs all layers on its n x n blocks; per layer, the :class:`NeighbourCache` supplies
the K/V of the blocks above and to the left that earlier batches computed, so the result
equals the whole-image ("full") evaluation, for any batch size and either scan order. The
cache lives for one evaluation only, like the reference's: a Heun step's second evaluation
sweeps the image again.

**The neighbour cache** carries out the schedule's cache steps (:class:`.schedule.CacheSteps`)
and decides nothing itself. Keys are stored after the QK-LayerNorm and RoPE but before the block
bias (which depends on the segment a block is seen in), values as projected. Each entry is a
copy that owns its memory, so a cached block never keeps its whole batch alive. With
offloading, entries the next batch does not read wait in host memory and are copied straight
into the key buffer of the batch that reads them.

**Several ranks.** A rank evaluates its own schedule (:func:`.schedule.plan_ranks`) on its band
of the image (:class:`.shard.ImageShard`) with an :class:`Exchange` (:mod:`.exchange`, on
``torch.distributed``): before a batch starts the exchange is told, so it can post the receives
of the batch's incoming blocks; in every layer the cache asks it for the blocks that have
arrived (:meth:`NeighbourCache.receive` puts them in) and hands it the batch's keys and values
to send, before the layer's attention runs. The arithmetic of a batch is the same wherever its
neighbours' keys come from.

**Layer 0's LR keys** (:class:`LRContext`). The reference projects the LR image with
``proj_lr``, zero-pads the token map by one LR block on every side and unfolds a
3x3-LR-block window per output block (every LR token nine times, at every evaluation). A
token's key and value depend on that token only (Linear, then the key LayerNorm), not on the
noise level; out-of-image tokens are zero vectors, whose keys are the normalised Linear bias.
So only the LR image is kept, and each batch computes the keys and values of the LR region
under its windows, on the device. Storing them for the whole image instead would take 2 x
hidden values per LR token: 21 GB in bf16 for a 16384x16384 output, against ~0.2% more work
per evaluation to recompute them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from .attention import gather_segments, token_positions
from .network import InfDiT, Neighbours
from .sampler import edm_precondition
from .schedule import Block, BlockBatch, CacheSteps, Placement, Schedule
from .shard import ImageShard

TILE_BLOCKS = 4
"""Keys and values are computed in fixed tiles of this many LR blocks per side, aligned to
the image: a token's values then come from the same computation (same shapes, hence the same
floating-point results) whichever batch asks for them, for any batch size and scan order."""


class LRContext:
    """The LR image of one sample, and the keys and values of layer 0's windows per batch."""

    def __init__(self, net: InfDiT, lr_image: torch.Tensor, placement: Placement):
        """``lr_image``: ``[B, 3, h, w]`` in [-1, 1], ``h`` and ``w`` whole LR blocks
        (``lr_block * lr_patch`` pixels)."""
        cfg = net.cfg
        self.net, self.placement, self.lb = net, placement, cfg.lr_block
        self.px = cfg.lr_block * cfg.lr_patch
        height, width = lr_image.shape[-2:]
        if height % self.px or width % self.px:
            raise ValueError(f"LR image {height}x{width} is not a whole number of {self.px}-px LR blocks")
        self.grid = (height // self.px, width // self.px)
        self.image = placement.to_store(lr_image.to(net.dtype))
        zero_token = torch.zeros(cfg.hidden, dtype=net.dtype, device=placement.device)
        self.outside = net.lr_xattn.token_key_values(zero_token)

    def _tile(self, row: int, col: int) -> torch.Tensor:
        """Keys and values ``[B, rows, cols, 2, H, d]`` of tile (row, col), on the device."""
        step = TILE_BLOCKS * self.px
        pixels = self.placement.to_device(self.image[:, :, row * step:(row + 1) * step, col * step:(col + 1) * step])
        xattn = self.net.lr_xattn
        return xattn.token_key_values(xattn.proj_lr(pixels).permute(0, 2, 3, 1))

    def windows(self, rows: range, cols: range) -> torch.Tensor:
        """Per block of ``rows x cols``: its window's keys and values ``[B, nr, nc, W, 2, H, d]``
        on the device, tokens in row-major window order (the reference's unfold order)."""
        lb, t = self.lb, TILE_BLOCKS
        region = self.outside.new_empty((self.image.shape[0], (len(rows) + 2) * lb, (len(cols) + 2) * lb)
                                        + self.outside.shape)
        region[:] = self.outside
        # LR blocks under the windows, inside the image; region block 0 is LR block start - 1.
        r_first, r_stop = max(rows.start - 1, 0), min(rows.stop + 1, self.grid[0])
        c_first, c_stop = max(cols.start - 1, 0), min(cols.stop + 1, self.grid[1])
        for tile_row in range(r_first // t, -(-r_stop // t)):
            for tile_col in range(c_first // t, -(-c_stop // t)):
                kv = self._tile(tile_row, tile_col)
                into_r, from_r = self._overlap(tile_row, kv.shape[1] // lb, r_first, r_stop, rows.start)
                into_c, from_c = self._overlap(tile_col, kv.shape[2] // lb, c_first, c_stop, cols.start)
                region[:, into_r, into_c] = kv[:, from_r, from_c]
                del kv
        win = region.unfold(1, 3 * lb, lb).unfold(2, 3 * lb, lb)
        return win.permute(0, 1, 2, 6, 7, 3, 4, 5).flatten(3, 4)

    def _overlap(self, tile: int, blocks: int, first: int, stop: int, start: int) -> tuple[slice, slice]:
        """Token slices (in the region, in the tile) where LR blocks ``[first, stop)`` meet a tile
        of ``blocks`` blocks; region block 0 is LR block ``start - 1``."""
        lo, hi = max(tile * TILE_BLOCKS, first), min(tile * TILE_BLOCKS + blocks, stop)
        lb, origin = self.lb, tile * TILE_BLOCKS
        return slice((lo - start + 1) * lb, (hi - start + 1) * lb), slice((lo - origin) * lb, (hi - origin) * lb)


class Exchange(Protocol):
    """Moves the K/V of blocks between ranks, as a rank's schedule lists them (positions are
    indices into that schedule's batches)."""

    def begin(self, position: int) -> None:
        """Batch ``position`` is about to start: its incoming blocks may be received."""

    def arrivals(self, position: int, layer: int) -> Iterable[tuple[Block, torch.Tensor, torch.Tensor]]:
        """The blocks received for batch ``position`` in ``layer``: ``(block, k, v)``, waited for."""

    def send(self, position: int, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Send what other ranks read of batch ``position``'s ``layer`` K/V (block layout)."""


class NeighbourCache:
    """The per-layer neighbour K/V of one evaluation, kept as the schedule's steps say."""

    def __init__(self, layers: int, placement: Placement):
        self.placement = placement
        self._entries: list[dict[Block, tuple[torch.Tensor, torch.Tensor, bool]]] = [{} for _ in range(layers)]

    def device_entries(self) -> int:
        """Cached blocks currently on the device, summed over layers."""
        return sum(on_device for entries in self._entries for *_, on_device in entries.values())

    def host_entries(self) -> int:
        """Cached blocks currently on the host, summed over layers."""
        return sum(not on_device for entries in self._entries for *_, on_device in entries.values())

    def receive(self, layer: int, block: Block, k: torch.Tensor, v: torch.Tensor, keep: bool) -> None:
        """Put a block computed elsewhere into ``layer`` (on the device). ``keep``: a later batch
        reads it too, so the entry gets its own memory (``k``/``v`` are views of a message)."""
        self._entries[layer][block] = (k.clone(), v.clone(), True) if keep else (k, v, True)

    def neighbours(self, batch: BlockBatch, steps: CacheSteps, position: int = 0,
                   exchange: Exchange | None = None) -> Neighbours:
        """The gather callback of ``batch`` (at ``position`` in its schedule): puts in the blocks
        received for it, extends its K/V with the cached blocks it reads, hands its K/V to the
        ``exchange`` to send, then carries out its cache steps."""
        dropped = set(steps.drop)

        def gather(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            entries = self._entries[layer]
            if exchange is not None:
                for block, kb, vb in exchange.arrivals(position, layer):
                    self.receive(layer, block, kb, vb, keep=block not in dropped)
            extended_k = self._extend(batch, k, entries, 0)
            extended_v = self._extend(batch, v, entries, 1)
            if exchange is not None and steps.send:
                exchange.send(position, layer, k, v)
            self._carry_out(steps, entries, batch, k, v)
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

    def _carry_out(self, steps: CacheSteps, entries: dict, batch: BlockBatch, k: torch.Tensor,
                   v: torch.Tensor) -> None:
        """Drop, offload, then store: device memory only grows by what stays on the device."""
        to_host = self.placement.to_host
        for block in steps.drop:
            del entries[block]
        for block in steps.offload:
            kb, vb, _ = entries[block]
            entries[block] = (to_host(kb), to_host(vb), False)
        for i, j in steps.store:
            r, c = i - batch.rows.start, j - batch.cols.start
            entries[(i, j)] = (k[:, r, c].clone(), v[:, r, c].clone(), True)
        for i, j in steps.store_on_host:
            r, c = i - batch.rows.start, j - batch.cols.start
            entries[(i, j)] = (to_host(k[:, r, c]), to_host(v[:, r, c]), False)


@dataclass
class ImageContext:
    """What stays fixed while one image is sampled: sigma-independent conditioning."""

    concat_lr: torch.Tensor
    """``[B, 3, H, W]`` bicubic-upsampled LR in [-1, 1] (model dtype), on the placement's store device."""
    lr: LRContext
    vector: torch.Tensor
    """``[B, vector_dim]`` CLIP image embedding."""


def evaluate(net: InfDiT, x: torch.Tensor, sigma: float, context: ImageContext, schedule: Schedule,
             placement: Placement, out: torch.Tensor, on_batch: Callable[[int, BlockBatch], None] | None = None,
             check_interrupt: Callable[[], None] | None = None, shard: ImageShard | None = None,
             exchange: Exchange | None = None) -> torch.Tensor:
    """Write the EDM denoiser output ``D = c_skip x + c_out F(c_in [x, lr]; sigma)`` into ``out``.

    ``x`` and ``out`` are ``[B, 3, H, W]`` fp32 on the store device; ``schedule``'s batches must
    cover the block grid (see :func:`.schedule.plan_schedule`), planned for ``placement``'s
    offloading. With several ranks, ``schedule`` is this rank's, ``x``, ``out`` and the context's
    upsampled LR hold ``shard``'s band, and ``exchange`` moves blocks between ranks.
    ``check_interrupt`` is called before every batch and ``on_batch(position, batch)`` after it
    (``position`` in the schedule; the batch's pixels in ``out`` are final then).
    """
    if schedule.offload != placement.offload:
        raise ValueError(f"the schedule was planned with offload={schedule.offload}, the placement has "
                         f"offload={placement.offload}: plan it for the placement")
    cfg, device = net.cfg, placement.device
    shard = shard if shard is not None else ImageShard.of(schedule, cfg.block_px)
    c_skip, c_out, c_in, c_noise = edm_precondition(sigma)
    cond = net.conditioning(torch.full((x.shape[0],), c_noise, device=device), context.vector.to(device))
    cache = NeighbourCache(cfg.layers, placement)
    for position, (batch, steps) in enumerate(zip(schedule.batches, schedule.steps)):
        if check_interrupt is not None:
            check_interrupt()
        if exchange is not None:
            exchange.begin(position)
        ys, xs = shard.slices(batch)
        x_batch = placement.to_device(x[:, :, ys, xs])
        h = net.embed(torch.cat([x_batch, placement.to_device(context.concat_lr[:, :, ys, xs])], dim=1) * c_in)
        rows, cols = token_positions(batch.rows, batch.cols, cfg.block, device)
        cos, sin = (t[..., None, :] for t in net.rope(rows, cols))
        gather = cache.neighbours(batch, steps, position, exchange)
        for layer in range(cfg.layers):
            window_kv = context.lr.windows(batch.rows, batch.cols) if layer == 0 else None
            h = net.layer(layer, h, cond, cos, sin, gather, window_kv)
            del window_kv
        out[:, :, ys, xs] = (c_skip * x_batch + c_out * net.output(h, cond).float()).to(out.device)
        del h
        if on_batch is not None:
            on_batch(position, batch)
    return out
