"""How a FLUX image's token grid is cut into horizontal stripes, one per device, and which rows
of keys and values each device needs from the others in every CLEAR attention call.

An image query sees the keys with ``dy**2 + dx**2 < r**2``: at most ``r - 1`` rows away (the
radius is an integer; ``ceil(r)`` rows for a real one, one more than needed here). So a device
that holds rows ``[a, b)`` needs, besides its own, the rows ``[a - (r - 1), a)`` and
``[b, b + r - 1)`` clipped to the grid: its *halo*. A stripe thinner than ``r - 1`` rows makes
a neighbour's halo reach past it, into the stripe after: the halo then comes from several
devices, each sending the rows of its own stripe that fall inside it.

With CLEAR's down-sampled keys (``d x d`` cells), stripe boundaries fall on multiples of ``d``
so every cell lies in one stripe and each device computes its own cells.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import NamedError


class StripeError(NamedError, ValueError):
    """The image cannot be cut into that many stripes."""


@dataclass(frozen=True)
class Transfer:
    """Rows ``rows`` of the grid, held by ``source``, sent to ``target``."""

    source: int
    target: int
    rows: range


@dataclass(frozen=True)
class StripePlan:
    """Row boundaries of the stripes (``bounds[p]`` to ``bounds[p + 1]`` for device ``p``) of an
    ``h x w`` grid, and the reach of the window (``radius - 1`` rows)."""

    grid: tuple[int, int]
    bounds: tuple[int, ...]
    reach: int
    align: int = 1

    @classmethod
    def split(cls, grid: tuple[int, int], devices: int, radius: int, align: int = 1) -> StripePlan:
        """Stripes as even as whole ``align``-row units allow (the last unit may be partial)."""
        if devices < 1 or radius < 1 or align < 1:
            raise StripeError(f"bad stripe request: {devices} devices, radius {radius}, rows in units of {align}")
        h = grid[0]
        units = -(-h // align)
        if units < devices:
            unit = "rows" if align == 1 else f"{align}-row bands (stripes hold whole {align}x{align} cells of the " \
                                             "down-sampled keys)"
            raise StripeError(f"the image has {h} token rows, {units} {unit}, too few for {devices} devices: use "
                              "fewer devices or a taller image")
        bounds = tuple(min(h, (p * units // devices) * align) for p in range(devices + 1))
        return cls(tuple(grid), bounds, radius - 1, align)

    @property
    def devices(self) -> int:
        return len(self.bounds) - 1

    def rows(self, rank: int) -> range:
        """The grid rows whose tokens (queries, keys, values, outputs) live on ``rank``."""
        return range(self.bounds[rank], self.bounds[rank + 1])

    def tokens(self, rank: int) -> range:
        """The same as token indices of the row-major image sequence."""
        rows, w = self.rows(rank), self.grid[1]
        return range(rows.start * w, rows.stop * w)

    def halo(self, rank: int) -> tuple[range, range]:
        """Rows above and below ``rank``'s stripe within reach of its queries (clipped to the grid)."""
        rows = self.rows(rank)
        return (range(max(0, rows.start - self.reach), rows.start),
                range(rows.stop, min(self.grid[0], rows.stop + self.reach)))

    def key_rows(self, rank: int) -> range:
        """The rows of keys ``rank`` attends to: its halo above, its stripe, its halo below."""
        above, below = self.halo(rank)
        return range(above.start, below.stop)

    def receives(self, rank: int) -> list[Transfer]:
        """What ``rank`` receives, in row order (the halo above first, nearest source last)."""
        return [t for source in range(self.devices) if source != rank
                for t in [self._transfer(source, rank)] if t is not None]

    def sends(self, rank: int) -> list[Transfer]:
        """What ``rank`` sends, to each device whose halo overlaps its stripe."""
        return [t for target in range(self.devices) if target != rank
                for t in [self._transfer(rank, target)] if t is not None]

    def _transfer(self, source: int, target: int) -> Transfer | None:
        own = self.rows(source)
        for part in self.halo(target):
            start, stop = max(own.start, part.start), min(own.stop, part.stop)
            if start < stop:
                return Transfer(source, target, range(start, stop))
        return None

    def cells(self, rank: int) -> int:
        """Complete ``align x align`` cells of ``rank``'s stripe (its down-sampled tokens)."""
        return (len(self.rows(rank)) // self.align) * (self.grid[1] // self.align)
