"""One CLEAR attention call inside a Flux: from post-RoPE q/k/v and the token layout of the
call to the attention output, with this layer's down-sampled branch and the chosen scale."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ...kernels import Backend, circular_window_attention
from .downsample import down_sample, mean_spatial_weight
from .parallel import StripeLayout, stripe_attention
from .pattern import ClearPattern, softmax_scale
from .weights import Block


@dataclass(frozen=True)
class TokenLayout:
    """What the model's input says about every joint attention call of one forward pass: the
    image token grid and the number of reference (Kontext) tokens appended after it."""

    grid: tuple[int, int]
    n_ref: int = 0

    @property
    def n_img(self) -> int:
        return self.grid[0] * self.grid[1]

    def text_tokens(self, length: int) -> int | None:
        """Text tokens in front of a sequence of ``length`` tokens, None if it cannot be this layout."""
        n_txt = length - self.n_img - self.n_ref
        return n_txt if n_txt >= 0 else None


@dataclass
class ClearAttention:
    """CLEAR attention for a patched Flux.

    ``spatial_weights`` holds each layer's learned ``[d, d]`` weight (from the file); without
    them every layer uses the mean. Reference tokens are global like text: their queries see
    every real token and every image query sees them.
    """

    pattern: ClearPattern
    spatial_weights: dict[Block, torch.Tensor] = field(default_factory=dict)
    proportional: bool = False
    backend: Backend = "auto"
    check_interrupt: Callable[[], None] | None = None

    def needs_block(self) -> bool:
        """True when the output depends on which block is calling (per-layer spatial weights)."""
        return self.pattern.down_factor > 1 and bool(self.spatial_weights)

    def is_plain_attention(self, layout: TokenLayout) -> bool:
        """True when CLEAR equals the model's own attention for this layout: every window holds
        the whole grid, no down-sampled keys and the default scale."""
        return self.pattern.covers(layout.grid) and self.pattern.down_factor == 1 and not self.proportional

    def _spatial_weight(self, block: Block | None) -> torch.Tensor:
        if not self.spatial_weights:
            return mean_spatial_weight(self.pattern.down_factor)
        if block is None:
            raise RuntimeError("CLEAR's down-sampled branch needs the calling block's index, and this "
                               "attention call did not say which block it comes from")
        if block not in self.spatial_weights:
            raise RuntimeError(f"no CLEAR spatial_weight for {block[0]} block {block[1]}")
        return self.spatial_weights[block]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout | StripeLayout,
                 block: Block | None = None) -> torch.Tensor:
        """``[B, heads, L, D]`` post-RoPE q/k/v of a joint ``[text | image | reference]`` call; under
        a :class:`StripeLayout` the image part is this device's stripe (:mod:`.parallel`)."""
        n_txt = layout.text_tokens(q.shape[2])
        if n_txt is None:
            raise ValueError(f"{q.shape[2]} tokens cannot hold a {layout.grid} image grid and {layout.n_ref} "
                             "reference tokens")
        if isinstance(layout, StripeLayout):
            down = self.pattern.down_factor > 1
            scale = softmax_scale(q.shape[-1], layout.sequence_length(n_txt), self.proportional, down)
            return stripe_attention(q, k, v, layout, n_txt, self.pattern.radius, scale,
                                    self._spatial_weight(block) if down else None, self.backend, self.check_interrupt)
        down_k = down_v = None
        if self.pattern.down_factor > 1:
            weight = self._spatial_weight(block)
            down_k = down_sample(k, layout.grid, n_txt, weight)
            down_v = down_sample(v, layout.grid, n_txt, weight)
        scale = softmax_scale(q.shape[-1], q.shape[2], self.proportional, self.pattern.down_factor > 1)
        return circular_window_attention(q, k, v, grid=layout.grid, n_txt=n_txt, radius=self.pattern.radius,
                                         n_ref=layout.n_ref, down_k=down_k, down_v=down_v, scale=scale,
                                         backend=self.backend, check_interrupt=self.check_interrupt)
