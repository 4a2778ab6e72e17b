"""The part of an image-sized buffer one rank keeps: one band of whole block rows or columns.

With several ranks (:func:`.schedule.plan_ranks`) a rank computes one stripe of the sweep's
lines, so its sampler buffers (x, D, the Heun slope and step, the upsampled LR) hold only
that band: block rows for a row-major sweep, block columns for a column-major one. One rank
alone holds the whole image. :meth:`ImageShard.slices` maps a batch of the rank to its
pixels in the local buffer, :meth:`ImageShard.take` cuts the band out of a whole image, and
:meth:`ImageShard.noise_mask` tells which values of the whole image's noise stream fall into
the band, so every rank draws exactly the noise a single device would draw for its pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .schedule import BlockBatch, Schedule

ROWS, COLUMNS = -2, -1


@dataclass(frozen=True)
class ImageShard:
    """Blocks ``band`` along ``axis`` (``ROWS`` or ``COLUMNS``) of a ``grid`` of ``block_px``-px blocks."""

    axis: int
    band: range
    grid: tuple[int, int]
    block_px: int

    @classmethod
    def of(cls, schedule: Schedule, block_px: int) -> ImageShard:
        """The band that a rank's batches cover (the whole image for one rank)."""
        rows, cols = schedule.grid
        if not schedule.batches:
            return cls(ROWS, range(0, 0), schedule.grid, block_px)
        covered = sum(len(batch.rows) * len(batch.cols) for batch in schedule.batches)  # batches never overlap
        for axis, spans, across in ((ROWS, [b.rows for b in schedule.batches], cols),
                                    (COLUMNS, [b.cols for b in schedule.batches], rows)):
            band = range(min(span.start for span in spans), max(span.stop for span in spans))
            if covered == len(band) * across and len({i for span in spans for i in span}) == len(band):
                return cls(axis, band, schedule.grid, block_px)
        raise ValueError("the rank's batches do not cover one band of whole block rows or columns")

    @property
    def whole(self) -> bool:
        """Whether the band is the whole image."""
        return self.axis == ROWS and self.band == range(0, self.grid[0])

    @property
    def pixels(self) -> slice:
        """The band's pixels along its axis, in image coordinates."""
        return slice(self.band.start * self.block_px, self.band.stop * self.block_px)

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """The band as ``(top, left, height, width)`` pixels of a ``height x width`` image."""
        start, size = self.pixels.start, self.pixels.stop - self.pixels.start
        return (start, 0, size, width) if self.axis == ROWS else (0, start, height, size)

    def shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the local buffer of an image-sized ``[..., H, W]`` buffer."""
        shape = list(image_shape)
        shape[self.axis] = len(self.band) * self.block_px
        return tuple(shape)

    def take(self, image: torch.Tensor) -> torch.Tensor:
        """The band of a whole image (a view; the whole image itself for one rank)."""
        return image if self.whole else image.narrow(self.axis, self.pixels.start, self.pixels.stop - self.pixels.start)

    def slices(self, batch: BlockBatch) -> tuple[slice, slice]:
        """The pixels ``(rows, columns)`` of ``batch`` in the local buffer."""
        px, offset = self.block_px, self.band.start
        rows, cols = batch.rows, batch.cols
        if self.axis == ROWS:
            rows = range(rows.start - offset, rows.stop - offset)
        else:
            cols = range(cols.start - offset, cols.stop - offset)
        return slice(rows.start * px, rows.stop * px), slice(cols.start * px, cols.stop * px)

    def noise_mask(self, start: int, stop: int, image_shape: tuple[int, ...]) -> torch.Tensor:
        """Which values ``[start, stop)`` of a whole image's flattened (row-major) buffer fall into
        the band; the local buffer holds them in the same order."""
        height, width = image_shape[-2:]
        index = torch.arange(start, stop) % (height * width)
        along = index // width if self.axis == ROWS else index % width
        along = along // self.block_px
        return (along >= self.band.start) & (along < self.band.stop)
