"""The GSPN weight file: safetensors with the layer list, the config, the base model family and
the training record in its metadata, so a file can be checked against a model before use.

Tensor keys are ``<attn1 module path>.<parameter>``, e.g.
``input_blocks.1.1.transformer_blocks.0.attn1.to_proxy.weight``. Files are written atomically
and read through :mod:`..weight_files` (a broken file or another kind of model is refused by
name, with what to do).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..weight_files import (SAFETENSORS, FileKind, WeightFileError, key_sections, name_first, read_weights,
                            refuse_keys, save_safetensors)
from .layers import GSPNConfig, GSPNLayers, LayerSpec

FORMAT = "ultrares.gspn"
FORMAT_VERSION = "1"
LAYER, PREDICTION = "layer", "prediction"  # the loss terms a distillation step reports


class GSPNWeightsError(WeightFileError):
    """A GSPN weight file that is broken, not one, or made for another model."""


GSPN_WEIGHTS = FileKind(
    name="GSPN weights made by this pack", error=GSPNWeightsError, formats=(SAFETENSORS,),
    remedy=("GSPN weights are made by the GSPN Distill node (or cli/gspn_distill.py) into models/gspn: copy the "
            "file again from where it was made, or distil it again."),
    holds=(f"GSPN weight files carry '{FORMAT}' metadata and keys such as "
           "input_blocks.1.1.transformer_blocks.0.attn1.to_proxy.weight"))


@dataclass
class TrainingRecord:
    """How far distillation got: total optimiser steps, per-step losses, last run's settings."""

    steps: int = 0
    layer_losses: list[float] = field(default_factory=list)
    prediction_losses: list[float] = field(default_factory=list)
    finished: bool = False
    settings: dict = field(default_factory=dict)

    def log(self, losses: Mapping[str, float]) -> None:
        """Append one step's terms (``layer``, and ``prediction`` when that term is on)."""
        self.layer_losses.append(losses[LAYER])
        if PREDICTION in losses:
            self.prediction_losses.append(losses[PREDICTION])


def save_gspn_weights(path: str | os.PathLike, layers: GSPNLayers, base_model: str,
                      record: TrainingRecord) -> None:
    """Write ``layers`` (fp32) with their metadata; ``base_model`` names the host family, e.g. ``SD15``."""
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in layers.named_state().items()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model": base_model,
        "layers": json.dumps([s.to_json() for s in layers.specs]),
        "config": json.dumps(asdict(layers.config)),
        "training": json.dumps(asdict(record)),
    }
    save_safetensors(tensors, path, metadata)


def _check_layers(name: str, file_specs: list[LayerSpec], model_specs: Sequence[LayerSpec]) -> None:
    have = {s.name: s.dim for s in file_specs}
    want = {s.name: s.dim for s in model_specs}
    missing = [f"{k} (width {v})" for k, v in want.items() if k not in have]
    extra = [f"{k} (width {v})" for k, v in have.items() if k not in want]
    resized = [f"{k} (file width {have[k]}, model width {v})" for k, v in want.items() if k in have and have[k] != v]
    sections = [f"{label}: {name_first(items)}" for label, items in (
        ("missing GSPN layers", missing), ("unexpected GSPN layers", extra), ("GSPN layers of another width", resized))
        if items]
    if sections:
        raise GSPNWeightsError(f"{name} does not fit this model's self-attention layers: {'; '.join(sections)}. "
                               "Distil weights for this model with the GSPN Distill node.")


def load_gspn_weights(path: str | os.PathLike, base_model: str | None = None,
                      layers: Sequence[LayerSpec] | None = None) -> tuple[GSPNLayers, TrainingRecord]:
    """Read a GSPN weight file; refuse it if it is broken, or made for another base model or other layers."""
    path = Path(path)
    state, meta = read_weights(path, GSPN_WEIGHTS)
    if meta.get("format_version") != FORMAT_VERSION:
        raise GSPNWeightsError(f"{path.name} has GSPN file format version {meta.get('format_version')!r}; "
                               f"this pack reads version {FORMAT_VERSION}")
    if base_model is not None and meta["base_model"] != base_model:
        raise GSPNWeightsError(f"{path.name} holds GSPN weights distilled for a {meta['base_model']} model, "
                               f"but this model is {base_model}; distil weights for it with the GSPN "
                               "distill node")
    specs = [LayerSpec.from_json(s) for s in json.loads(meta["layers"])]
    if layers is not None:
        _check_layers(path.name, specs, layers)
    gspn = GSPNLayers(specs, GSPNConfig(**json.loads(meta["config"])))
    sections = key_sections({k: v.shape for k, v in state.items()},
                            {k: v.shape for k, v in gspn.named_state().items()}, "GSPN")
    if sections:
        raise refuse_keys(path, GSPN_WEIGHTS, sections, "the layers its own metadata lists (a damaged file, or one "
                          "from another version)")
    gspn.load_named_state(state)
    return gspn, TrainingRecord(**json.loads(meta["training"]))
