"""The optimiser's state saved next to a weight file, so that a resumed distillation continues
where it stopped.

AdamW scales each update by running averages of the gradient and of its square. Restarted
from zero, its first updates move every parameter by about the learning rate whatever its
gradient: each resume would jolt the trained weights. The state is kept out of the weight
file, which is what users share and the patch nodes load: it is twice the weights' size and
only useful for resuming. It is stamped with the step count of the weights it belongs to and
only restored onto weights with that count.

Parameters are named by the weight file's keys, so the state file reads like the weights:
``<key>.exp_avg``, ``<key>.exp_avg_sq``, ``<key>.step``. A weight file kept in the model's own
16-bit precision (as CLEAR's are, like the released ones) also gets the float32 values the
optimiser updates, ``<key>.master``: a resumed run then continues from exactly those.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..weight_files import FileKind, read_weights, save_safetensors

SUFFIX = ".optimizer"  # not a model-file extension, so ComfyUI's file lists do not show it
MASTER = "master"      # the entry holding a parameter's own float32 value


def optimizer_path(weights: str | os.PathLike) -> Path:
    """Where the optimiser state of the weight file ``weights`` lives: ``<weights>.optimizer``."""
    weights = Path(weights)
    return weights.with_name(weights.name + SUFFIX)


def save_optimizer_state(path: str | os.PathLike, parameters: Mapping[str, torch.nn.Parameter],
                         optimizer: torch.optim.Optimizer, steps: int, file_format: str,
                         masters: bool = False) -> None:
    """Write the per-parameter state of ``optimizer`` after ``steps`` steps (atomically), with
    ``file_format`` in the metadata; ``masters`` adds the parameters' own values (for weight
    files saved in lower precision)."""
    tensors = {f"{name}.{entry}": torch.as_tensor(value).detach().to("cpu").contiguous()
               for name, parameter in parameters.items()
               for entry, value in optimizer.state.get(parameter, {}).items()}
    if masters:
        tensors.update({f"{name}.{MASTER}": parameter.detach().to("cpu", torch.float32).contiguous()
                        for name, parameter in parameters.items()})
    save_safetensors(tensors, path, {"format": file_format, "steps": str(steps)})


def load_optimizer_state(path: str | os.PathLike, parameters: Mapping[str, torch.nn.Parameter],
                         optimizer: torch.optim.Optimizer, steps: int, kind: FileKind) -> bool:
    """Put the saved state into ``optimizer`` if ``path`` holds it for exactly these parameters
    after ``steps`` steps; returns whether it did (nothing changes otherwise). A file that is
    broken or not of ``kind`` is refused with ``kind``'s error. Saved ``master`` values are
    copied into the parameters. Hyperparameters such as the learning rate stay those of
    ``optimizer``."""
    path = Path(path)
    if not path.is_file():
        return False
    tensors, meta = read_weights(path, kind)
    if meta.get("steps") != str(steps):
        return False
    saved: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, entry = key.rpartition(".")
        saved.setdefault(name, {})[entry] = value
    if set(saved) != set(parameters):
        return False
    states, values = {}, {}
    for name, parameter in parameters.items():
        state = dict(saved[name])
        if any(v.dim() and v.shape != parameter.shape for v in state.values()):
            return False
        if MASTER in state:
            values[parameter] = state.pop(MASTER)
        # Moments live with their parameter; AdamW keeps its step count on the CPU.
        states[parameter] = {k: v.to(parameter.device) if v.dim() else v for k, v in state.items()}
    optimizer.state.update(states)
    with torch.no_grad():
        for parameter, value in values.items():
            parameter.copy_(value)
    return True
