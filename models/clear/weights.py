"""The released CLEAR files and their placement on a Flux's parameters.

A released file (``distill.py`` saves it) holds, in diffusers naming, the fine-tuned attention
projections of every FLUX block and, in the down-sampled variants, each layer's
``spatial_weight``:

- ``transformer_blocks.{i}.attn.{to_q,to_k,to_v,to_out.0}.{weight,bias}`` (double blocks, image
  stream; the text stream is not trained),
- ``single_transformer_blocks.{i}.attn.{to_q,to_k,to_v}.{weight,bias}`` (single blocks have no
  ``to_out``),
- ``{transformer_blocks,single_transformer_blocks}.{i}.attn.processor.spatial_weight``, shape
  ``(1, 1, 1, d, 1, d, 1)``.

Where each tensor goes on a Flux comes from a *key map* ``diffusers key -> target`` or
``-> (target, (dim, start, length))`` for a slice of a fused tensor (``img_attn.qkv``,
``single_blocks.N.linear1``): the host's own map (ComfyUI's ``comfy.utils.flux_to_diffusers``)
is passed in, and this module checks the file against it and against the model's shapes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ..key_lists import name_first

DOUBLE_PREFIX = "transformer_blocks"
SINGLE_PREFIX = "single_transformer_blocks"
DOUBLE_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
SINGLE_PROJECTIONS = ("to_q", "to_k", "to_v")
SPATIAL_SUFFIX = "attn.processor.spatial_weight"

Block = tuple[str, int]  # ("double", i) or ("single", i)
Offset = tuple[int, int, int]  # (dim, start, length) of a slice
KeyMap = Mapping[str, "str | tuple[str, Offset]"]


class ClearFileError(ValueError):
    """A CLEAR weights file that does not fit the model it is applied to."""


def _natural(key: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def released_keys(depth: int, depth_single: int, down_sampled: bool) -> list[str]:
    """Every key a released file holds for a Flux with these block counts."""
    keys = []
    for prefix, count, projections in ((DOUBLE_PREFIX, depth, DOUBLE_PROJECTIONS),
                                       (SINGLE_PREFIX, depth_single, SINGLE_PROJECTIONS)):
        for i in range(count):
            keys += [f"{prefix}.{i}.attn.{p}.{end}" for p in projections for end in ("weight", "bias")]
            if down_sampled:
                keys.append(f"{prefix}.{i}.{SPATIAL_SUFFIX}")
    return keys


def block_of(key: str) -> Block:
    """The block a released key belongs to: ``transformer_blocks.3...`` -> ``("double", 3)``."""
    prefix, index = key.split(".")[:2]
    return ("double" if prefix == DOUBLE_PREFIX else "single"), int(index)


@dataclass(frozen=True)
class WeightPatch:
    """Replace ``target`` (or its ``offset`` slice) by ``tensor``."""

    target: str
    offset: Offset | None
    tensor: torch.Tensor


@dataclass(frozen=True)
class ClearWeights:
    """A checked file: the weight replacements and each layer's ``[d, d]`` spatial weight."""

    patches: list[WeightPatch]
    spatial_weights: dict[Block, torch.Tensor]

    @property
    def spatial_size(self) -> int | None:
        """``d`` of the down-sampled variant, None for a window-only file."""
        return next(iter(self.spatial_weights.values())).shape[0] if self.spatial_weights else None


def _spatial_weights(state_dict: Mapping[str, torch.Tensor], name: str) -> dict[Block, torch.Tensor]:
    weights, sizes = {}, set()
    for key in sorted((k for k in state_dict if k.endswith(SPATIAL_SUFFIX)), key=_natural):
        tensor = state_dict[key]
        size = round(tensor.numel() ** 0.5)
        if tensor.shape not in ((1, 1, 1, size, 1, size, 1), (size, size)):
            raise ClearFileError(f"{name}: {key} has shape {tuple(tensor.shape)}, expected (1, 1, 1, d, 1, d, 1)")
        weights[block_of(key)] = tensor.reshape(size, size).float()
        sizes.add(size)
    if len(sizes) > 1:
        raise ClearFileError(f"{name}: spatial_weight sizes differ between layers: {sorted(sizes)}")
    return weights


def _slice_shape(shape: tuple[int, ...], offset: Offset | None) -> tuple[int, ...] | None:
    if offset is None:
        return tuple(shape)
    dim, start, length = offset
    if start + length > shape[dim]:
        return None
    return tuple(length if i == dim else size for i, size in enumerate(shape))


def plan_weights(state_dict: Mapping[str, torch.Tensor], key_map: KeyMap, model_shapes: Mapping[str, tuple[int, ...]],
                 depth: int, depth_single: int, name: str,
                 on_progress: Callable[[int, int], None] | None = None,
                 check_interrupt: Callable[[], None] | None = None) -> ClearWeights:
    """Check a released file against a Flux (block counts, host key map, parameter shapes) and
    list the weight replacements; raises :class:`ClearFileError` naming the first bad keys."""
    down_sampled = any(k.endswith(SPATIAL_SUFFIX) for k in state_dict)
    expected = released_keys(depth, depth_single, down_sampled)
    missing = [k for k in expected if k not in state_dict]
    unexpected = sorted(set(state_dict) - set(expected), key=_natural)
    if missing or unexpected:
        parts = [f"missing {name_first(missing)}" if missing else "", f"unexpected {name_first(unexpected)}" if unexpected else ""]
        raise ClearFileError(f"{name} does not fit this Flux ({depth} double + {depth_single} single blocks): "
                             + "; ".join(p for p in parts if p))
    spatial = _spatial_weights(state_dict, name)

    projections = [k for k in expected if not k.endswith(SPATIAL_SUFFIX)]
    patches, bad = [], []
    for done, key in enumerate(projections):
        if check_interrupt is not None:
            check_interrupt()
        entry = key_map.get(key)
        if entry is None:
            bad.append(f"{key} (no place on this model)")
            continue
        target, offset = (entry, None) if isinstance(entry, str) else entry
        shape = model_shapes.get(target)
        want = None if shape is None else _slice_shape(shape, offset)
        got = tuple(state_dict[key].shape)
        if want != got:
            where = target if offset is None else f"{target}[dim {offset[0]}: {offset[1]}:{offset[1] + offset[2]}]"
            found = want if want is not None else "(absent)" if shape is None else f"(outside its shape {shape})"
            bad.append(f"{key} {got} vs {where} {found}")
            continue
        patches.append(WeightPatch(target, offset, state_dict[key]))
        if on_progress is not None:
            on_progress(done + 1, len(projections))
    if bad:
        raise ClearFileError(f"{name} does not fit this Flux: {name_first(bad)}")
    return ClearWeights(patches, spatial)
