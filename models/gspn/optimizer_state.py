"""The optimiser's state saved next to a GSPN weight file, so that a resumed distillation
continues where it stopped.

AdamW scales each update by running averages of the gradient and of its square. Restarted
from zero, its first updates move every parameter by about the learning rate whatever its
gradient: each resume would jolt the trained modules. The state is kept out of the weight
file, which is what users share and the patch node loads: it is twice the weights' size and
only useful for resuming. It is stamped with the step count of the weights it belongs to
and only restored onto weights with that count.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..weight_files import SAFETENSORS, FileKind, read_weights, save_safetensors
from .layers import GSPNLayers
from .weights import GSPNWeightsError

FORMAT = "ultrares.gspn.optimizer"
SUFFIX = ".optimizer"  # not a model-file extension, so ComfyUI's file lists do not show it
OPTIMIZER_STATE = FileKind(
    name="the optimizer state of a GSPN distillation", error=GSPNWeightsError, formats=(SAFETENSORS,),
    remedy=("Delete it to resume with a fresh optimizer (its first steps then move every weight by about the "
            "learning rate), or put back an intact copy."),
    holds=f"an optimizer state file carries '{FORMAT}' metadata")


def optimizer_path(weights: str | os.PathLike) -> Path:
    """Where the optimiser state of the weight file ``weights`` lives: ``<weights>.optimizer``."""
    weights = Path(weights)
    return weights.with_name(weights.name + SUFFIX)


def make_optimizer(student: GSPNLayers, learning_rate: float) -> torch.optim.Optimizer:
    """The distillation optimiser: AdamW without weight decay over every GSPN parameter."""
    return torch.optim.AdamW(student.parameters(), lr=learning_rate, weight_decay=0.0)


def _named_parameters(layers: GSPNLayers) -> Iterator[tuple[str, nn.Parameter]]:
    """Parameters named like the weight file's keys (``<layer path>.<parameter>``)."""
    for spec, module in layers.items():
        for key, parameter in module.named_parameters():
            yield f"{spec.name}.{key}", parameter


def save_optimizer_state(path: str | os.PathLike, layers: GSPNLayers, optimizer: torch.optim.Optimizer,
                         steps: int) -> None:
    """Write the per-parameter state of ``optimizer`` for ``layers`` after ``steps`` training steps."""
    tensors = {}
    for name, parameter in _named_parameters(layers):
        for key, value in optimizer.state.get(parameter, {}).items():
            tensors[f"{name}.{key}"] = torch.as_tensor(value).detach().to("cpu").contiguous()
    save_safetensors(tensors, path, {"format": FORMAT, "steps": str(steps)})


def load_optimizer_state(path: str | os.PathLike, layers: GSPNLayers, optimizer: torch.optim.Optimizer,
                         steps: int) -> bool:
    """Put the saved state into ``optimizer`` if ``path`` holds it for these layers after ``steps``
    steps; returns whether it did (nothing is changed otherwise). Hyperparameters such as the
    learning rate stay those of ``optimizer``. A broken file is refused (:class:`GSPNWeightsError`)."""
    path = Path(path)
    if not path.is_file():
        return False
    tensors, meta = read_weights(path, OPTIMIZER_STATE)
    if meta.get("steps") != str(steps):
        return False
    saved: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, entry = key.rpartition(".")
        saved.setdefault(name, {})[entry] = value
    states = {}
    for name, parameter in _named_parameters(layers):
        state = saved.get(name)
        if not state or any(v.dim() and v.shape != parameter.shape for v in state.values()):
            return False
        # Moments live with their parameter; AdamW keeps its step count on the CPU.
        states[parameter] = {k: v.to(parameter.device) if v.dim() else v for k, v in state.items()}
    optimizer.state.update(states)
    return True
