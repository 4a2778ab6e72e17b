"""Keys and values of layer 0's nearby-LR cross-attention, built per block batch.

The reference projects the LR image with ``proj_lr``, zero-pads the token map by one LR
block on every side and unfolds a 3x3-LR-block window per output block (every LR token nine
times, at every evaluation). A token's key and value depend on that token only (Linear,
then the key LayerNorm), not on the noise level; out-of-image tokens are zero vectors, whose
keys are the normalised Linear bias. So only the LR image is kept, and each batch computes
the keys and values of the LR region under its windows, on the device. Storing them for the
whole image instead would take 2 x hidden values per LR token: 21 GB in bf16 for a
16384x16384 output, against ~0.2% more work per evaluation to recompute them.
"""

from __future__ import annotations

import torch

from .network import InfDiT
from .schedule import Placement

TILE_BLOCKS = 4
"""Keys and values are computed in fixed tiles of this many LR blocks per side, aligned to
the image: a token's values then come from the same computation (same shapes, hence the same
floating-point results) whichever batch asks for them, for any batch size and scan order."""


class LRContext:
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
