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
from pathlib import Path

import torch
from torch import nn

from ..training.optimizer_state import optimizer_path
from ..weight_files import SAFETENSORS, FileKind, read_weights, save_safetensors
from .layers import GSPNLayers
from .module import file_layout, module_layout
from .weights import GSPNWeightsError

FORMAT = "ultrares.gspn.optimizer"
OPTIMIZER_STATE = FileKind(
    name="the optimizer state of a GSPN distillation", error=GSPNWeightsError, formats=(SAFETENSORS,),
    remedy=("Delete it to resume with a fresh optimizer (its first steps then move every weight by about the "
            "learning rate), or put back an intact copy."),
    holds=f"an optimizer state file carries '{FORMAT}' metadata")


def make_optimizer(student: GSPNLayers, learning_rate: float) -> torch.optim.Optimizer:
    """The distillation optimiser: AdamW without weight decay over every GSPN parameter."""
    return torch.optim.AdamW(student.parameters(), lr=learning_rate, weight_decay=0.0)


def _entries(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """The optimiser's state of one GSPN module by entry (``exp_avg`` ...), in the weight file's layout."""
    by_entry: dict[str, dict[str, torch.Tensor]] = {}
    for name, parameter in module.named_parameters():
        for entry, value in optimizer.state.get(parameter, {}).items():
            by_entry.setdefault(entry, {})[name] = torch.as_tensor(value)
    return {entry: file_layout(named) for entry, named in by_entry.items()}


def save_optimizer_state(path: str | os.PathLike, layers: GSPNLayers, optimizer: torch.optim.Optimizer,
                         steps: int) -> None:
    """Write the per-parameter state of ``optimizer`` for ``layers`` after ``steps`` training steps,
    keyed ``<weight file key>.<entry>``."""
    tensors = {f"{spec.name}.{key}.{entry}": value.detach().to("cpu").contiguous()
               for spec, module in layers.items() for entry, named in _entries(module, optimizer).items()
               for key, value in named.items()}
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
    states = {}
    for spec, module in layers.items():
        by_entry: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            stem, _, entry = key.rpartition(".")
            if stem.startswith(spec.name + "."):
                by_entry.setdefault(entry, {})[stem[len(spec.name) + 1:]] = value
        per_entry = {entry: module_layout(stored) for entry, stored in by_entry.items()}
        for name, parameter in module.named_parameters():
            state = {entry: named[name] for entry, named in per_entry.items() if name in named}
            if not state or any(v.dim() and v.shape != parameter.shape for v in state.values()):
                return False
            # Moments live with their parameter; AdamW keeps its step count on the CPU.
            states[parameter] = {k: v.to(parameter.device) if v.dim() else v for k, v in state.items()}
    optimizer.state.update(states)
    return True
