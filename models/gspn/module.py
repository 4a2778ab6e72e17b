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

Each direction's projections are Linear layers of their own (built from ``operations``, as in
ComfyUI's networks, so ``comfy.ops`` can cast or offload every one of them); the weight file
keeps its layout of one matrix per projection over the four directions (:func:`file_layout`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import ModuleType

import torch
from torch import nn

from ...kernels import DIRECTIONS, Backend, gspn_scan

Operations = ModuleType | type
"""A namespace with a ``Linear`` class: ``torch.nn``, or one of ``comfy.ops`` (``manual_cast`` ...)."""

PROJECTIONS = ("to_weights", "to_lambda", "to_gate", "to_skip")
"""A direction's projections from the proxy; the weight file stores each as one matrix over the
four directions (rows: direction, then neighbour for ``to_weights``, then channel)."""


class GSPNDirection(nn.Module):
    """What one scan direction reads from the proxy: the three neighbour logits of every channel
    (rows: neighbour row - 1, same row, row + 1), lambda (input gate, from the key's proxy), and
    u (output gate) and the skip term (from the query's proxy)."""

    def __init__(self, dim: int, proxy_dim: int, operations: Operations = nn, **factory):
        super().__init__()
        self.to_weights = operations.Linear(proxy_dim, 3 * dim, bias=False, **factory)
        self.to_lambda = operations.Linear(proxy_dim, dim, bias=False, **factory)
        self.to_gate = operations.Linear(proxy_dim, dim, bias=False, **factory)
        self.to_skip = operations.Linear(proxy_dim, dim, bias=False, **factory)


class GSPNAttention(nn.Module):
    """GSPN replacement for one self-attention layer of width ``dim``; its Linear layers come
    from ``operations`` (default ``torch.nn``), as in ComfyUI's own networks."""

    def __init__(self, dim: int, proxy_dim: int, chunk: int | None = 4, operations: Operations = nn):
        super().__init__()
        self.dim, self.proxy_dim, self.chunk = dim, proxy_dim, chunk
        # Built without values, then drawn by reset_parameters in the weight file's layout.
        meta = {"device": "meta"}
        self.to_proxy = operations.Linear(dim, proxy_dim, bias=False, **meta)
        self.directions = nn.ModuleList(GSPNDirection(dim, proxy_dim, operations, **meta) for _ in DIRECTIONS)
        self.merge = nn.Parameter(torch.empty(len(DIRECTIONS), **meta))
        self.to_out = operations.Linear(dim, dim, **meta)
        self.to_empty(device="cpu")
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation, each projection drawn over the four directions at once
        (the file's layout: a seed gives the modules it always gave, whatever ``operations``
        skips); the merge starts as the mean and the output projection as the identity, since the
        host's own output projection follows this module."""
        nn.init.kaiming_uniform_(self.to_proxy.weight, a=math.sqrt(5))
        for name in PROJECTIONS:
            first = getattr(self.directions[0], name).weight
            fused = torch.empty(len(DIRECTIONS) * first.shape[0], first.shape[1])
            nn.init.kaiming_uniform_(fused, a=math.sqrt(5))
            for direction, rows in zip(self.directions, fused.chunk(len(DIRECTIONS))):
                getattr(direction, name).weight.copy_(rows)
        self.merge.fill_(1.0 / len(DIRECTIONS))
        nn.Linear.reset_parameters(self.to_out)
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
        for d, direction in enumerate(self.directions):
            h = self._propagate(x, proxy_q, proxy_k, d, backend)
            gate = direction.to_gate(proxy_q).reshape(x.shape)
            skip = direction.to_skip(proxy_q).reshape(x.shape)
            out = torch.addcmul(out, self.merge[d], torch.addcmul(skip * x, gate, h))
        return self.to_out(out.reshape(n, tokens, dim))

    def _propagate(self, x: torch.Tensor, proxy_q: torch.Tensor, proxy_k: torch.Tensor, d: int,
                   backend: Backend) -> torch.Tensor:
        """The scan of direction ``d``. Its logits (three maps' worth) and lambda are freed on
        return, before the gates are made, so in inference they do not add to the peak."""
        n, height, width, dim = x.shape
        direction = self.directions[d]
        logits = direction.to_weights(proxy_q).reshape(n, height, width, 3, dim)
        lam = direction.to_lambda(proxy_k).reshape(x.shape)
        return gspn_scan(x, lam, logits, d, self.chunk, backend)


def file_layout(named: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-parameter tensors of one :class:`GSPNAttention` (its weights, or an optimiser's state of
    them) in the weight file's layout: ``directions.<d>.<projection>.weight`` joined into
    ``<projection>.weight``, the directions' rows one after the other. Scalars (an optimiser's
    step count) are the same for every direction and are kept once."""
    out, parts = {}, {}
    for key, value in named.items():
        head, _, rest = key.partition(".")
        if head == "directions":
            index, _, name = rest.partition(".")
            parts.setdefault(name, {})[int(index)] = value
        else:
            out[key] = value
    for name, by_direction in parts.items():
        ordered = [by_direction[d] for d in sorted(by_direction)]
        out[name] = torch.cat(ordered) if ordered[0].dim() else ordered[0]
    return out


def module_layout(stored: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`file_layout`: a stored ``<projection>.weight`` split into the
    directions' parameters (a scalar copied to each: an optimiser counts each one's steps in place)."""
    out = {}
    for key, value in stored.items():
        if key.partition(".")[0] in PROJECTIONS:
            rows = value.chunk(len(DIRECTIONS)) if value.dim() else [value.clone() for _ in DIRECTIONS]
            out.update({f"directions.{d}.{key}": part for d, part in enumerate(rows)})
        else:
            out[key] = value
    return out
