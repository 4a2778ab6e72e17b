"""Attention over a part of the keys, kept unnormalised so parts computed apart combine exactly.

Softmax attention of a query over keys ``K = K_1 ∪ ... ∪ K_P`` is

    out = (Σ_p Σ_{j∈K_p} exp(s_j) v_j) / (Σ_p Σ_{j∈K_p} exp(s_j)),   s_j = scale · q·k_j.

:func:`softmax_partials` computes, for one part, the row maximum ``m_p`` of its scores, the sum
``l_p = Σ exp(s_j - m_p)`` and the accumulator ``a_p = Σ exp(s_j - m_p) v_j`` (float32, the
state of an online softmax). With ``M = max_p m_p``, rescaling every part to ``M``
(:meth:`SoftmaxPartials.rescaled`) turns the two sums into plain sums over the parts, so devices
that each hold one part of the keys combine them with one all-reduce of the maxima (max) and one
of the rescaled sums and accumulators (sum); :meth:`SoftmaxPartials.merge` is the same combine
for two parts in one place, :meth:`SoftmaxPartials.output` the division. No key is moved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Budget for one chunk's float32 scores (queries x keys x batch x heads): bounds the memory of a
# part with many keys (a device's whole stripe of image tokens).
SCORE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class SoftmaxPartials:
    """One part's unnormalised attention: ``acc`` ``[..., T, D]``, ``max`` and ``sum`` ``[..., T]``,
    all float32 (``max`` is ``-inf`` and the others 0 for a part without keys)."""

    acc: torch.Tensor
    max: torch.Tensor
    sum: torch.Tensor

    def rescaled(self, new_max: torch.Tensor) -> SoftmaxPartials:
        """The same part relative to ``new_max`` (>= this part's max): ``sum`` and ``acc`` times
        ``exp(max - new_max)``; a part without keys stays 0."""
        factor = torch.where(self.max == float("-inf"), 0.0, torch.exp(self.max - new_max))
        return SoftmaxPartials(self.acc * factor[..., None], new_max, self.sum * factor)

    def merge(self, other: SoftmaxPartials) -> SoftmaxPartials:
        """Both parts' keys as one part."""
        top = torch.maximum(self.max, other.max)
        a, b = self.rescaled(top), other.rescaled(top)
        return SoftmaxPartials(a.acc + b.acc, top, a.sum + b.sum)

    def output(self, dtype: torch.dtype) -> torch.Tensor:
        """The attention output ``acc / sum`` in ``dtype``."""
        return (self.acc / self.sum[..., None]).to(dtype)


def softmax_partials(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> SoftmaxPartials:
    """Unnormalised attention of ``q`` ``[..., T, D]`` over ``k``, ``v`` ``[..., N, D]`` (any N,
    0 included), in float32, the keys in chunks of :data:`SCORE_BYTES` of scores."""
    shape = q.shape[:-1]
    if k.shape[-2] == 0:
        return SoftmaxPartials(q.new_zeros((*shape, v.shape[-1]), dtype=torch.float32),
                               q.new_full(shape, float("-inf"), dtype=torch.float32),
                               q.new_zeros(shape, dtype=torch.float32))
    queries = q.float() * scale
    rows = max(1, q[..., 0].numel())
    chunk = max(1, SCORE_BYTES // (4 * rows))
    state = None
    for start in range(0, k.shape[-2], chunk):
        keys, values = k[..., start:start + chunk, :].float(), v[..., start:start + chunk, :].float()
        scores = queries @ keys.transpose(-1, -2)
        top = scores.amax(dim=-1)
        weights = torch.exp(scores - top[..., None])
        part = SoftmaxPartials(weights @ values, top, weights.sum(dim=-1))
        state = part if state is None else state.merge(part)
    return state
