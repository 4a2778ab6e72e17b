"""One network evaluation D(x; sigma) over the whole image, one block batch at a time.

A batch runs all layers on its n x n blocks; per layer, the :class:`NeighbourCache` supplies
the K/V of the blocks above and to the left that earlier batches computed, so the result
equals the whole-image ("full") evaluation, for any batch size and either scan order. The
cache lives for one evaluation only, like the reference's: a Heun step's second evaluation
sweeps the image again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .attention import token_positions
from .kv_cache import NeighbourCache
from .lr_context import LRContext
from .network import InfDiT
from .sampler import edm_precondition
from .schedule import BlockBatch, CacheSchedule, Placement


@dataclass
class ImageContext:
    """What stays fixed while one image is sampled: sigma-independent conditioning."""

    concat_lr: torch.Tensor
    """``[B, 3, H, W]`` bicubic-upsampled LR in [-1, 1] (model dtype), on the placement's store device."""
    lr: LRContext
    vector: torch.Tensor
    """``[B, vector_dim]`` CLIP image embedding."""


def evaluate(net: InfDiT, x: torch.Tensor, sigma: float, context: ImageContext, batches: list[BlockBatch],
             placement: Placement, out: torch.Tensor, on_batch: Callable[[], None] | None = None,
             check_interrupt: Callable[[], None] | None = None) -> torch.Tensor:
    """Write the EDM denoiser output ``D = c_skip x + c_out F(c_in [x, lr]; sigma)`` into ``out``.

    ``x`` and ``out`` are ``[B, 3, H, W]`` fp32 on the store device; ``batches`` must cover the
    block grid in a valid UniBA order (see :func:`.schedule.plan_batches`). ``check_interrupt`` is
    called before every batch and ``on_batch`` after it.
    """
    cfg, device = net.cfg, placement.device
    c_skip, c_out, c_in, c_noise = edm_precondition(sigma)
    cond = net.conditioning(torch.full((x.shape[0],), c_noise, device=device), context.vector.to(device))
    cache = NeighbourCache(CacheSchedule(batches), cfg.layers, placement)
    px = cfg.block_px
    for index, batch in enumerate(batches):
        if check_interrupt is not None:
            check_interrupt()
        ys, xs = slice(batch.rows.start * px, batch.rows.stop * px), slice(batch.cols.start * px, batch.cols.stop * px)
        x_batch = placement.to_device(x[:, :, ys, xs])
        h = net.embed(torch.cat([x_batch, placement.to_device(context.concat_lr[:, :, ys, xs])], dim=1) * c_in)
        rows, cols = token_positions(batch.rows, batch.cols, cfg.block, device)
        cos, sin = (t[..., None, :] for t in net.rope(rows, cols))
        gather = cache.neighbours(index)
        for layer in range(cfg.layers):
            window_kv = context.lr.windows(batch.rows, batch.cols) if layer == 0 else None
            h = net.layer(layer, h, cond, cos, sin, gather, window_kv)
            del window_kv
        out[:, :, ys, xs] = (c_skip * x_batch + c_out * net.output(h, cond).float()).to(out.device)
        del h
        if on_batch is not None:
            on_batch()
    return out
