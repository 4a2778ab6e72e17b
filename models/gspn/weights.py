"""The GSPN weight file: safetensors with the layer list, the config, the base model family and
the training record in its metadata, so a file can be checked against a model before use.

Tensor keys are ``<attn1 module path>.<parameter>``, e.g.
``input_blocks.1.1.transformer_blocks.0.attn1.to_proxy.weight``. Files are written to a
temporary name and renamed, so an interrupted save never leaves a broken file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..key_lists import name_first
from .layers import GSPNConfig, GSPNLayers, LayerSpec

FORMAT = "ultrares.gspn"
FORMAT_VERSION = "1"
LAYER, PREDICTION = "layer", "prediction"  # the loss terms a distillation step reports


class GSPNWeightsError(ValueError):
    """A GSPN weight file that is not one, or that was made for another model."""


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
    path = Path(path)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in layers.named_state().items()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model": base_model,
        "layers": json.dumps([s.to_json() for s in layers.specs]),
        "config": json.dumps(asdict(layers.config)),
        "training": json.dumps(asdict(record)),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, path)


def _check_layers(name: str, file_specs: list[LayerSpec], model_specs: Sequence[LayerSpec]) -> None:
    have = {s.name: s.dim for s in file_specs}
    want = {s.name: s.dim for s in model_specs}
    missing = [f"{k} (width {v})" for k, v in want.items() if k not in have]
    extra = [f"{k} (width {v})" for k, v in have.items() if k not in want]
    resized = [f"{k} (file width {have[k]}, model width {v})" for k, v in want.items() if k in have and have[k] != v]
    problems = [f"{label}: {name_first(items)}" for label, items in (
        ("layers of the model missing from the file", missing), ("layers the model does not have", extra),
        ("layers of another width", resized)) if items]
    if problems:
        raise GSPNWeightsError(f"{name} does not fit this model's self-attention layers; " + "; ".join(problems))


def _open(path: Path):
    """``safe_open`` with a message that names the file when it is no safetensors file at all."""
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as error:
        raise GSPNWeightsError(f"{path.name} is not a GSPN weight file of this pack (not a safetensors file: "
                               f"{error}); make one with the GSPN distill node") from None


def load_gspn_weights(path: str | os.PathLike, base_model: str | None = None,
                      layers: Sequence[LayerSpec] | None = None) -> tuple[GSPNLayers, TrainingRecord]:
    """Read a GSPN weight file; refuse it if it was made for another base model or other layers."""
    path = Path(path)
    with _open(path) as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise GSPNWeightsError(f"{path.name} is not a GSPN weight file of this pack (no '{FORMAT}' "
                                   "metadata); make one with the GSPN distill node")
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
        state = {key: f.get_tensor(key) for key in f.keys()}
    gspn = GSPNLayers(specs, GSPNConfig(**json.loads(meta["config"])))
    expected = {k: v.shape for k, v in gspn.named_state().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if state[k].shape != expected[k])
    if missing or unexpected or wrong:
        details = [f"{label}: {name_first(keys)}" for label, keys in (
            ("missing keys", missing), ("unexpected keys", unexpected),
            ("keys with the wrong shape", [f"{k} {tuple(state[k].shape)} != {tuple(expected[k])}" for k in wrong]))
            if keys]
        raise GSPNWeightsError(f"{path.name} is damaged or from another version; " + "; ".join(details))
    gspn.load_named_state(state)
    return gspn, TrainingRecord(**json.loads(meta["training"]))
