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
Files are opened through :mod:`..weight_files`, which refuses broken files and other kinds of
model (a FLUX LoRA, a checkpoint ...) by name before any of this.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ..weight_files import (FileKind, Loader, WeightFileError, key_sections, name_first, natural_order, read_weights,
                            refuse_keys)

DOUBLE_PREFIX = "transformer_blocks"
SINGLE_PREFIX = "single_transformer_blocks"
DOUBLE_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
SINGLE_PROJECTIONS = ("to_q", "to_k", "to_v")
SPATIAL_SUFFIX = "attn.processor.spatial_weight"

Block = tuple[str, int]  # ("double", i) or ("single", i)
Offset = tuple[int, int, int]  # (dim, start, length) of a slice
KeyMap = Mapping[str, "str | tuple[str, Offset]"]


class ClearWeightsError(WeightFileError):
    """A CLEAR weights file that is broken, of another kind, or does not fit the model it is applied to."""


CLEAR_WEIGHTS = FileKind(
    name="CLEAR weights", error=ClearWeightsError,
    remedy=("CLEAR weights are the clear_local_<r>[_down_<d>].safetensors files of the Hugging Face repo "
            "Huage001/CLEAR, or files the CLEAR Distill node made: download or copy the file (again) into "
            "models/clear."),
    holds="CLEAR files hold FLUX attention projections such as transformer_blocks.0.attn.to_q.weight")


def read_clear_file(path: str | os.PathLike, load: Loader | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """A CLEAR file's tensors and metadata, read by ``load`` (the host's reader) or the pack's own
    after the checks every weight file gets (empty, incomplete, another format or kind)."""
    return read_weights(path, CLEAR_WEIGHTS, load)


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
    for key in sorted((k for k in state_dict if k.endswith(SPATIAL_SUFFIX)), key=natural_order):
        tensor = state_dict[key]
        size = round(tensor.numel() ** 0.5)
        if tensor.shape not in ((1, 1, 1, size, 1, size, 1), (size, size)):
            raise ClearWeightsError(f"{name}: {key} has shape {tuple(tensor.shape)}, expected (1, 1, 1, d, 1, d, 1)")
        weights[block_of(key)] = tensor.reshape(size, size).float()
        sizes.add(size)
    if len(sizes) > 1:
        raise ClearWeightsError(f"{name}: spatial_weight sizes differ between layers: {sorted(sizes)}")
    return weights


def _slice_shape(shape: tuple[int, ...], offset: Offset | None) -> tuple[int, ...] | None:
    if offset is None:
        return tuple(shape)
    dim, start, length = offset
    if start + length > shape[dim]:
        return None
    return tuple(length if i == dim else size for i, size in enumerate(shape))


def _placement(key: str, key_map: KeyMap, model_shapes: Mapping[str, tuple[int, ...]]
               ) -> tuple[str, Offset | None, tuple[int, ...]] | str:
    """Where a projection goes on the model and the shape it must have there, or why it has no place."""
    entry = key_map.get(key)
    if entry is None:
        return f"{key} (not in the host's key map)"
    target, offset = (entry, None) if isinstance(entry, str) else entry
    shape = model_shapes.get(target)
    if shape is None:
        return f"{key} ({target} is not a parameter of this model)"
    want = _slice_shape(shape, offset)
    if want is None:
        return f"{key} ({target}[dim {offset[0]}: {offset[1]}:{offset[1] + offset[2]}] is outside its shape {shape})"
    return target, offset, want


def plan_weights(state_dict: Mapping[str, torch.Tensor], key_map: KeyMap, model_shapes: Mapping[str, tuple[int, ...]],
                 depth: int, depth_single: int, name: str,
                 on_progress: Callable[[int, int], None] | None = None,
                 check_interrupt: Callable[[], None] | None = None) -> ClearWeights:
    """Check a released file against a Flux (block counts, host key map, parameter shapes) and
    list the weight replacements; raises :class:`ClearWeightsError` naming the first bad keys."""
    fits = f"this Flux ({depth} double + {depth_single} single blocks)"
    down_sampled = any(k.endswith(SPATIAL_SUFFIX) for k in state_dict)
    expected = released_keys(depth, depth_single, down_sampled)
    found = {key: tuple(value.shape) for key, value in state_dict.items()}
    sections = key_sections(found, dict.fromkeys(expected), "CLEAR")
    if sections:
        raise refuse_keys(name, CLEAR_WEIGHTS, sections, fits)
    spatial = _spatial_weights(state_dict, name)

    projections = [k for k in expected if not k.endswith(SPATIAL_SUFFIX)]
    patches, shapes, unplaced = [], {}, []
    for done, key in enumerate(projections):
        if check_interrupt is not None:
            check_interrupt()
        place = _placement(key, key_map, model_shapes)
        if isinstance(place, str):
            unplaced.append(place)
            continue
        target, offset, shapes[key] = place
        if shapes[key] == found[key]:
            patches.append(WeightPatch(target, offset, state_dict[key]))
            if on_progress is not None:
                on_progress(done + 1, len(projections))
    sections = key_sections({key: found[key] for key in shapes}, shapes, "CLEAR")
    if unplaced:
        sections.append(f"CLEAR keys with no place on this model: {name_first(unplaced)}")
    if sections:
        raise refuse_keys(name, CLEAR_WEIGHTS, sections, fits)
    return ClearWeights(patches, spatial)
