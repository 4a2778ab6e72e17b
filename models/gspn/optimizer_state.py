"""The optimiser of a GSPN distillation and its state beside the weight file (the pack's
shared resume format, :mod:`ultrares.models.training.optimizer_state`, keyed like the GSPN
file: ``<layer path>.<parameter>``)."""

from __future__ import annotations

import os

import torch
from torch import nn

from ..training import optimizer_state as shared
from ..training.optimizer_state import SUFFIX, optimizer_path
from .layers import GSPNLayers

FORMAT = "ultrares.gspn.optimizer"

__all__ = ["FORMAT", "SUFFIX", "load_optimizer_state", "make_optimizer", "optimizer_path", "save_optimizer_state"]


def make_optimizer(student: GSPNLayers, learning_rate: float) -> torch.optim.Optimizer:
    """The distillation optimiser: AdamW without weight decay over every GSPN parameter."""
    return torch.optim.AdamW(student.parameters(), lr=learning_rate, weight_decay=0.0)


def _named_parameters(layers: GSPNLayers) -> dict[str, nn.Parameter]:
    """Parameters named like the weight file's keys (``<layer path>.<parameter>``)."""
    return {f"{spec.name}.{key}": parameter for spec, module in layers.items()
            for key, parameter in module.named_parameters()}


def save_optimizer_state(path: str | os.PathLike, layers: GSPNLayers, optimizer: torch.optim.Optimizer,
                         steps: int) -> None:
    """Write the per-parameter state of ``optimizer`` for ``layers`` after ``steps`` training steps."""
    shared.save_optimizer_state(path, _named_parameters(layers), optimizer, steps, FORMAT)


def load_optimizer_state(path: str | os.PathLike, layers: GSPNLayers, optimizer: torch.optim.Optimizer,
                         steps: int) -> bool:
    """Put the saved state into ``optimizer`` if ``path`` holds it for these layers after ``steps``
    steps; returns whether it did (nothing is changed otherwise). Hyperparameters such as the
    learning rate stay those of ``optimizer``."""
    return shared.load_optimizer_state(path, _named_parameters(layers), optimizer, steps, FORMAT)
