"""Keys and values of layer 0's nearby-LR cross-attention, computed once per image.

The reference projects the LR image with ``proj_lr``, zero-pads the token map by one LR
block on every side and unfolds a 3x3-LR-block window per output block (every LR token nine
times, recomputed at every evaluation). The keys and values of a token depend on the token
only (Linear, then the key LayerNorm) and not on the noise level, so this module computes
them once for the padded token map — out-of-image tokens are zero vectors, whose keys are
the normalised Linear bias — and cuts the windows of a batch out of it when asked.
"""

from __future__ import annotations

import torch

from .network import InfDiT
from .placement import Placement

TILE_BLOCKS = 4
"""The map is built in tiles of this many blocks per side: bounded device memory, and the same
tiling (hence the same floating-point results) whatever batch size the sweep uses."""


class LRContext:
    def __init__(self, net: InfDiT, lr_image: torch.Tensor, placement: Placement):
        """``lr_image``: ``[B, 3, h, w]`` in [-1, 1], ``h`` and ``w`` whole LR blocks
        (``lr_block * lr_patch`` pixels)."""
        cfg = net.cfg
        self.net, self.placement, self.lb = net, placement, cfg.lr_block
        px = cfg.lr_block * cfg.lr_patch
        batch, _, height, width = lr_image.shape
        if height % px or width % px:
            raise ValueError(f"LR image {height}x{width} is not a whole number of {px}-px LR blocks")
        grid_rows, grid_cols = height // px, width // px
        xattn = net.lr_xattn
        zero_token = torch.zeros(cfg.hidden, dtype=net.dtype, device=placement.device)
        shape = (batch, (grid_rows + 2) * self.lb, (grid_cols + 2) * self.lb, 2, cfg.heads, cfg.head_dim)
        self.map = placement.empty_store(shape, net.dtype)
        self.map[:] = xattn.token_key_values(zero_token).to(self.map.device)
        step = TILE_BLOCKS * px
        for top in range(0, height, step):
            for left in range(0, width, step):
                tile = placement.to_device(lr_image[:, :, top:top + step, left:left + step]).to(net.dtype)
                tokens = xattn.proj_lr(tile).permute(0, 2, 3, 1)
                kv = xattn.token_key_values(tokens)
                r0, c0 = self.lb + top // cfg.lr_patch, self.lb + left // cfg.lr_patch
                self.map[:, r0:r0 + kv.shape[1], c0:c0 + kv.shape[2]] = kv.to(self.map.device)

    def windows(self, rows: range, cols: range) -> torch.Tensor:
        """Per block of ``rows x cols``: its window's keys and values ``[B, nr, nc, W, 2, H, d]``
        on the device, tokens in row-major window order (the reference's unfold order)."""
        lb = self.lb
        region = self.placement.to_device(self.map[:, rows.start * lb:(rows.stop + 2) * lb,
                                                   cols.start * lb:(cols.stop + 2) * lb])
        win = region.unfold(1, 3 * lb, lb).unfold(2, 3 * lb, lb)
        return win.permute(0, 1, 2, 6, 7, 3, 4, 5).flatten(3, 4)
