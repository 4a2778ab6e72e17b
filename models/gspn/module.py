"""One GSPN layer in place of a UNet self-attention (``attn1``), after the paper's
text-to-image design: a 1x1 projection to a small proxy dimension, 1x1 projections from it
to the three neighbour-weight logits, lambda (input gate), u (output gate) and the skip term
of each of the four directions, four scans, a learned merge and an output projection.

It is fed with the host layer's own query, key and value (that is what an ``attn1`` replace
hook hands over) and its result goes through the host's ``to_out``, like attention's does.
That follows the paper's SD-XL ("non-pure") recipe with the host's Q, K, V standing in for
``x + Q``, ``x + K``, ``x + V``: the value is what gets propagated (attention also outputs
a mix of values), the key drives the input gate lambda, the query the output gate u, the
neighbour weights and the skip term. Unlike the reference code, each direction's result is
mapped back to its own pixel before the merge, so any H x W map and any batch size work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.backend import Backend
from ...kernels.gspn_scan import DIRECTIONS, gspn_scan


class GSPNAttention(nn.Module):
    """GSPN replacement for one self-attention layer of width ``dim``."""

    def __init__(self, dim: int, proxy_dim: int, chunk: int | None = 4):
        super().__init__()
        self.dim, self.proxy_dim, self.chunk = dim, proxy_dim, chunk
        directions = len(DIRECTIONS)
        self.to_proxy = nn.Linear(dim, proxy_dim, bias=False)
        # Rows are [direction][neighbour (row - 1, same row, row + 1)][channel].
        self.to_weights = nn.Linear(proxy_dim, directions * 3 * dim, bias=False)
        self.to_lambda = nn.Linear(proxy_dim, directions * dim, bias=False)
        self.to_gate = nn.Linear(proxy_dim, directions * dim, bias=False)
        self.to_skip = nn.Linear(proxy_dim, directions * dim, bias=False)
        self.merge = nn.Parameter(torch.full((directions,), 1.0 / directions))
        self.to_out = nn.Linear(dim, dim)
        # Starts as the host's own output projection (which follows this module).
        nn.init.eye_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, height: int, width: int,
                backend: Backend = "auto") -> torch.Tensor:
        """``q, k, v``: ``(N, height*width, dim)`` tokens in row-major order; returns the same shape."""
        n, tokens, dim = v.shape
        if tokens != height * width or dim != self.dim:
            raise ValueError(f"GSPN layer of width {self.dim} got tokens {tuple(v.shape)} for a "
                             f"{height}x{width} map")
        proxy_q, proxy_k = self.to_proxy(q), self.to_proxy(k)
        x = v.reshape(n, height, width, dim)
        out = torch.zeros_like(x)
        for d in range(len(DIRECTIONS)):
            rows = slice(d * dim, (d + 1) * dim)
            h = self._propagate(x, proxy_q, proxy_k, d, backend)
            gate = F.linear(proxy_q, self.to_gate.weight[rows]).reshape(x.shape)
            skip = F.linear(proxy_q, self.to_skip.weight[rows]).reshape(x.shape)
            out = torch.addcmul(out, self.merge[d], torch.addcmul(skip * x, gate, h))
        return self.to_out(out.reshape(n, tokens, dim))

    def _propagate(self, x: torch.Tensor, proxy_q: torch.Tensor, proxy_k: torch.Tensor, direction: int,
                   backend: Backend) -> torch.Tensor:
        """The scan of one direction. Its logits (three maps' worth) and lambda are freed on
        return, before the gates are made, so in inference they do not add to the peak."""
        n, height, width, dim = x.shape
        rows = slice(direction * dim, (direction + 1) * dim)
        logits = F.linear(proxy_q, self.to_weights.weight[3 * rows.start:3 * rows.stop])
        lam = F.linear(proxy_k, self.to_lambda.weight[rows]).reshape(x.shape)
        return gspn_scan(x, lam, logits.reshape(n, height, width, 3, dim), direction, self.chunk, backend)
