"""One CLEAR attention call of a Flux whose image tokens are split into horizontal stripes, one
per device (:mod:`.stripes`), computed exactly: the output equals the one-device call.

Every device holds the text (and Kontext reference) tokens and its stripe of image tokens,
with q/k/v after RoPE from the tokens' global positions. Per call, device ``p``:

1. sends the rows of keys and values its neighbours' halos need and receives its own halo
   (:meth:`StripePlan.receives`; point to point, ``r - 1`` rows each way);
2. with the down-sampled variant, computes the ``d x d`` cells of its stripe and gathers every
   device's cells (all of them, in row-major cell order, as one device would compute them);
3. runs the image queries of its stripe on the pack's kernel over the keys
   ``[text | halo above, stripe, halo below | reference]`` (``query_rows``: only the stripe's
   queries are computed; the circle is clipped by the local grid only where the image ends);
4. attends the text and reference queries to its stripe's image keys (:mod:`..kernels.softmax_partials`)
   and combines the devices' partial softmaxes with two all-reduces (the maxima, then the
   rescaled sums and accumulators); the text and reference keys, held by every device, are
   added once, on each device, after the reduction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...kernels import Backend, SoftmaxPartials, circular_window_attention, softmax_partials
from .communicator import Communicator
from .downsample import down_sample
from .stripes import StripePlan


@dataclass(frozen=True)
class StripeLayout:
    """The token layout of one device's attention calls: the whole image's ``grid`` and
    reference tokens, the stripe plan, this device's ``rank`` and its :class:`Communicator`."""

    grid: tuple[int, int]
    n_ref: int
    plan: StripePlan
    rank: int
    comm: Communicator

    @property
    def n_img(self) -> int:
        """Image tokens on this device (its stripe)."""
        return len(self.plan.tokens(self.rank))

    def text_tokens(self, length: int) -> int | None:
        """Text tokens in front of a local sequence of ``length`` tokens, None if it cannot be this layout."""
        n_txt = length - self.n_img - self.n_ref
        return n_txt if n_txt >= 0 else None

    def sequence_length(self, n_txt: int) -> int:
        """Tokens of the whole image's sequence (what the softmax scale counts)."""
        return n_txt + self.grid[0] * self.grid[1] + self.n_ref


def _halo_keys(k: torch.Tensor, v: torch.Tensor, n_txt: int, layout: StripeLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """``[halo above | stripe | halo below]`` image keys and values of this device."""
    plan, rank, w = layout.plan, layout.rank, layout.grid[1]
    own = plan.rows(rank)

    def rows_of(x: torch.Tensor, rows: range) -> torch.Tensor:
        return x[:, :, n_txt + (rows.start - own.start) * w:n_txt + (rows.stop - own.start) * w]

    sends = {t.target: torch.stack([rows_of(k, t.rows), rows_of(v, t.rows)]) for t in plan.sends(rank)}
    incoming = plan.receives(rank)
    receives = {t.source: k.new_empty((2, k.shape[0], k.shape[1], len(t.rows) * w, k.shape[3])) for t in incoming}
    layout.comm.exchange(sends, receives)
    above = [receives[t.source] for t in incoming if t.rows.start < own.start]
    below = [receives[t.source] for t in incoming if t.rows.start >= own.stop]
    stripe = torch.stack([rows_of(k, own), rows_of(v, own)])
    keys, values = torch.cat([*above, stripe, *below], dim=3).unbind(0)
    return keys, values


def _down_sampled(k: torch.Tensor, v: torch.Tensor, n_txt: int, layout: StripeLayout,
                  weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every device's down-sampled keys and values, each computed from its own stripe."""
    plan, rank = layout.plan, layout.rank
    stripe = (len(plan.rows(rank)), layout.grid[1])
    cells = torch.stack([down_sample(k, stripe, n_txt, weight), down_sample(v, stripe, n_txt, weight)])
    gathered = layout.comm.all_gather(cells, [plan.cells(p) for p in range(plan.devices)], dim=3)
    return gathered[0], gathered[1]


def _global_tokens(x: torch.Tensor, image: slice) -> torch.Tensor:
    """The text and reference tokens of a local sequence, without the stripe between them."""
    return torch.cat([x[:, :, :image.start], x[:, :, image.stop:]], dim=2)


def _global_queries(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, image: slice, layout: StripeLayout,
                    scale: float) -> torch.Tensor:
    """Text and reference queries over every key: this stripe's image keys combined across the
    devices, then the global keys (the same on every device) added once."""
    queries = _global_tokens(q, image)
    part = softmax_partials(queries, k[:, :, image], v[:, :, image], scale)
    top = layout.comm.all_reduce(part.max, "max")
    part = part.rescaled(top)
    summed = layout.comm.all_reduce(torch.cat([part.acc, part.sum[..., None]], dim=-1), "sum")
    images = SoftmaxPartials(summed[..., :-1], top, summed[..., -1])
    side = softmax_partials(queries, _global_tokens(k, image), _global_tokens(v, image), scale)
    return images.merge(side).output(q.dtype)


def stripe_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: StripeLayout, n_txt: int, radius: int,
                     scale: float, spatial_weight: torch.Tensor | None = None, backend: Backend = "auto",
                     check_interrupt: Callable[[], None] | None = None) -> torch.Tensor:
    """This device's part of one CLEAR call: q/k/v ``[B, heads, n_txt + stripe + n_ref, D]``
    (post-RoPE) -> the attention output of the same tokens. ``spatial_weight`` (``[d, d]``)
    turns on the down-sampled keys; the plan's stripes must then start on multiples of ``d``."""
    plan = layout.plan
    image = slice(n_txt, n_txt + layout.n_img)
    keys, values = _halo_keys(k, v, n_txt, layout)
    down_k = down_v = None
    if spatial_weight is not None:
        if plan.align % spatial_weight.shape[0]:
            raise ValueError(f"stripes cut on multiples of {plan.align} rows cannot hold whole "
                             f"{spatial_weight.shape[0]}x{spatial_weight.shape[0]} cells")
        down_k, down_v = _down_sampled(k, v, n_txt, layout, spatial_weight)
    local_k = torch.cat([k[:, :, :n_txt], keys, k[:, :, image.stop:]], dim=2)
    local_v = torch.cat([v[:, :, :n_txt], values, v[:, :, image.stop:]], dim=2)
    key_rows, own = plan.key_rows(layout.rank), plan.rows(layout.rank)
    start = own.start - key_rows.start
    image_out = circular_window_attention(
        q[:, :, image], local_k, local_v, grid=(len(key_rows), layout.grid[1]), n_txt=n_txt, radius=radius,
        n_ref=layout.n_ref, down_k=down_k, down_v=down_v, scale=scale, backend=backend,
        check_interrupt=check_interrupt, query_rows=(start, start + len(own)))
    global_out = _global_queries(q, k, v, image, layout, scale)
    return torch.cat([global_out[:, :, :n_txt], image_out, global_out[:, :, n_txt:]], dim=2)


def call_payload(plan: StripePlan, rank: int, batch: int, heads: int, head_dim: int, n_global: int,
                 down_sampled: bool, element_size: int) -> dict[str, int]:
    """Bytes ``rank`` contributes to each step of one call (the kinds :class:`MeteredCommunicator`
    counts): halo rows of keys and values sent, the float32 maxima and sums+accumulators of its
    ``n_global`` text and reference queries, its down-sampled keys and values."""
    per_token = 2 * batch * heads * head_dim * element_size  # a key and a value
    rows = sum(len(t.rows) for t in plan.sends(rank))
    payload = {"exchange": rows * plan.grid[1] * per_token,
               "all_reduce_max": batch * heads * n_global * 4,
               "all_reduce_sum": batch * heads * n_global * (head_dim + 1) * 4}
    if down_sampled:
        payload["all_gather"] = plan.cells(rank) * per_token
    return payload
