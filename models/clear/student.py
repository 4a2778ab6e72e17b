"""The distillation student: exactly the tensors a released CLEAR file holds, as trainable
float32 parameters named by the file's keys, and how they take the place of a Flux's weights.

What the reference trains (``distill.py``: every parameter whose name contains
``.attn.to_q.``, ``.attn.to_k.``, ``.attn.to_v.``, ``.attn.to_out.`` or ``spatial_weight``):
the image-stream q/k/v and output projections of every double block, the q/k/v of every
single block (weights and biases), and in the ``_down_`` variants each layer's
``spatial_weight`` (initialised to ``1/d**2``). Everything else stays the teacher's.

On a Flux these tensors are slices of fused weights (``img_attn.qkv``, ``single_blocks.N.linear1``),
placed by the same host key map the patch node uses (:func:`.weights.plan_weights`);
:func:`assemble` builds the fused weight the student runs with from the teacher's weight and
the trainable slices, differentiably.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from .downsample import mean_spatial_weight
from .pattern import ClearPattern
from .weights import SPATIAL_SUFFIX, Block, Offset, block_of, released_keys

def _slot(key: str) -> str:
    """A parameter name for a file key (module attribute names cannot hold dots)."""
    return key.replace(".", "__")


class SpatialWeights(Mapping[Block, torch.Tensor]):
    """Each layer's ``[d, d]`` spatial weight, read from the student's parameters on every access
    (so every forward pass records its own view for autograd)."""

    def __init__(self, student: ClearStudent):
        self._student = student

    def __getitem__(self, block: Block) -> torch.Tensor:
        key = self._student.spatial_keys.get(block)
        if key is None:
            raise KeyError(block)
        d = self._student.pattern.down_factor
        return self._student.parameter(key).reshape(d, d)

    def __iter__(self) -> Iterator[Block]:
        return iter(self._student.spatial_keys)

    def __len__(self) -> int:
        return len(self._student.spatial_keys)


class ClearStudent(nn.Module):
    """The trainable tensors of a CLEAR file for a Flux with ``depth`` double and ``depth_single``
    single blocks, keyed like the released files."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], pattern: ClearPattern, depth: int, depth_single: int):
        """``tensors`` holds every projection of the released layout (the teacher's weights to
        start from, or a file's to resume); missing ``spatial_weight`` entries start at the mean."""
        super().__init__()
        self.pattern, self.depth, self.depth_single = pattern, depth, depth_single
        down_sampled = pattern.down_factor > 1
        self.keys = released_keys(depth, depth_single, down_sampled)
        unexpected = sorted(set(tensors) - set(self.keys))
        missing = [k for k in self.keys if k not in tensors and not k.endswith(SPATIAL_SUFFIX)]
        if missing or unexpected:
            raise ValueError(f"CLEAR student tensors do not match the released layout for {depth} double + "
                             f"{depth_single} single blocks (down factor {pattern.down_factor}): missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]}")
        self.spatial_keys: dict[Block, str] = {}
        for key in self.keys:
            if key.endswith(SPATIAL_SUFFIX):
                d = pattern.down_factor
                value = tensors.get(key, mean_spatial_weight(d)).reshape(1, 1, 1, d, 1, d, 1)
                self.spatial_keys[block_of(key)] = key
            else:
                value = tensors[key]
            self.register_parameter(_slot(key), nn.Parameter(value.detach().to(torch.float32).clone()))

    def parameter(self, key: str) -> nn.Parameter:
        """The trainable tensor of the file key ``key``."""
        return getattr(self, _slot(key))

    def by_key(self) -> dict[str, nn.Parameter]:
        """Every trainable tensor by file key, in the released order."""
        return {key: self.parameter(key) for key in self.keys}

    def spatial_weights(self) -> SpatialWeights:
        """Each layer's ``[d, d]`` spatial weight, differentiable (empty without down-sampling)."""
        return SpatialWeights(self)

    def file_tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The released file's tensors in ``dtype`` on the CPU (spatial weights in the released
        ``(1, 1, 1, d, 1, d, 1)`` shape)."""
        return {key: value.detach().to("cpu", dtype).contiguous() for key, value in self.by_key().items()}


def assemble(weight: torch.Tensor, pieces: Sequence[tuple[Offset | None, torch.Tensor]]) -> torch.Tensor:
    """``weight`` with each ``(offset, tensor)`` piece in place of its slice (``offset=None``: the
    whole tensor), in ``weight``'s dtype; differentiable with respect to the pieces.

    A fused ``[q; k; v; mlp_in]`` weight becomes ``cat(q, k, v, weight[mlp rows])``: the parts
    the student does not train are the teacher's own values.
    """
    whole = [tensor for offset, tensor in pieces if offset is None]
    if whole:
        return whole[0].to(weight.dtype)
    dims = {offset[0] for offset, _ in pieces}
    if len(dims) != 1:
        raise ValueError(f"pieces of one tensor must be slices along one dimension, got {sorted(dims)}")
    dim = dims.pop()
    parts, position = [], 0
    for (_, start, length), tensor in sorted(pieces, key=lambda piece: piece[0][1]):
        if start < position:
            raise ValueError(f"overlapping slices at {start} along dimension {dim}")
        if start > position:
            parts.append(weight.narrow(dim, position, start - position))
        parts.append(tensor.to(weight.dtype))
        position = start + length
    if position < weight.shape[dim]:
        parts.append(weight.narrow(dim, position, weight.shape[dim] - position))
    return torch.cat(parts, dim=dim)
