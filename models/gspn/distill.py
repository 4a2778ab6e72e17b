"""Distillation: train GSPN modules to reproduce every self-attention output of the model they
will replace, on that model's own sampling trajectories.

The teacher is the unpatched model. It samples trajectories (Euler steps on the host's sigma
schedule, one prompt after another); at every point the query, key, value and output of each
``attn1`` are captured. Each GSPN module is then trained to turn its layer's q, k, v into
that layer's attention output (before the shared output projection ``to_out``, which the
host applies to both): layer-wise output matching, all layers at once from one teacher pass,
with no gradient through the frozen UNet. Optionally a final-prediction term runs the whole
model with GSPN in every ``attn1`` and matches the teacher's prediction (the paper's recipe
matches layer outputs and predictions; this term needs gradients through the UNet).
The loop is host-free: a :class:`DistillHost` runs the model; the ComfyUI node and the
command line both drive this same function. Its optimisation loop (progress, interruption,
saves) is the one every distillation of the pack shares (:func:`ultrares.models.training.train`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import NamedTuple, Protocol

import torch

from ..training import TOTAL, euler_step, train
from .layers import GSPNLayers
from .optimizer_state import make_optimizer
from .weights import LAYER, PREDICTION, TrainingRecord


class Capture(NamedTuple):
    """One ``attn1`` call of the teacher: its inputs, its output (before ``to_out``) and its map size."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    height: int
    width: int


class DistillHost(Protocol):
    """What the loop needs from the model being distilled."""

    prompt_count: int

    def sigmas(self) -> torch.Tensor:
        """Noise levels of one sampling trajectory, descending, ending at 0."""

    def start(self, seed: int) -> torch.Tensor:
        """The noisy latent at ``sigmas()[0]`` that a trajectory starts from."""

    def teacher(self, x: torch.Tensor, sigma: torch.Tensor, prompt: int) -> tuple[torch.Tensor, dict[str, Capture]]:
        """The unpatched model's denoised prediction and every ``attn1`` call, keyed by layer
        module path. Runs without gradients; the captured tensors must be usable by autograd."""

    def student(self, x: torch.Tensor, sigma: torch.Tensor, prompt: int, gspn: GSPNLayers) -> torch.Tensor:
        """The denoised prediction with GSPN in every ``attn1``, differentiable w.r.t. ``gspn``."""


@dataclass
class DistillSettings:
    """One distillation run's settings (the node's and the command line's inputs)."""

    steps: int = 1000                 # optimiser steps in this run
    learning_rate: float = 1e-3
    prediction_weight: float = 0.0    # weight of the final-prediction term (0 = layer outputs only)
    seed: int = 0
    save_every: int = 100             # also saved at the end and when stopped early
    max_grad_norm: float = 1.0


def relative_error(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the teacher's mean square: 1 = as far off as predicting zeros."""
    teacher = teacher.float()
    return (student.float() - teacher).pow(2).mean() / teacher.pow(2).mean().clamp(min=1e-12)


def _layer_errors(gspn: GSPNLayers, captures: dict[str, Capture]) -> Iterator[torch.Tensor]:
    """The relative error of each GSPN module on its layer's captured call, one layer at a time."""
    missing = sorted({s.name for s in gspn.specs} - set(captures))
    if missing:
        raise RuntimeError(f"the teacher pass did not capture attn1 calls of {missing}")
    for spec, module in gspn.items():
        c = captures[spec.name]
        weight = module.to_proxy.weight
        out = module(*(t.to(weight.device, weight.dtype) for t in (c.q, c.k, c.v)), c.height, c.width)
        yield relative_error(out, c.out.to(out.device))


def layer_matching_loss(gspn: GSPNLayers, captures: dict[str, Capture]) -> torch.Tensor:
    """Mean over layers of the relative error of each GSPN module on its layer's captured call."""
    return torch.stack(list(_layer_errors(gspn, captures))).mean()


def layer_matching_backward(gspn: GSPNLayers, captures: dict[str, Capture]) -> torch.Tensor:
    """``layer_matching_loss(gspn, captures).backward()`` one layer at a time; returns the loss, detached.

    The layers share no parameters, so the gradients are the same, but each layer's graph is
    freed before the next one is built: the memory peak is that of the largest layer instead
    of all of them (about 25 GB for SDXL's 70 layers at 1024 x 1024 with CFG, by estimate).
    """
    errors = []
    for error in _layer_errors(gspn, captures):
        (error / len(gspn.specs)).backward()
        errors.append(error.detach())
    return torch.stack(errors).mean()


class _Point(NamedTuple):
    x: torch.Tensor
    sigma: torch.Tensor
    prompt: int
    denoised: torch.Tensor
    captures: dict[str, Capture]


def trajectory_points(host: DistillHost, seed: int) -> Iterator[_Point]:
    """The teacher's own sampling trajectories (Euler), one prompt after another, endlessly."""
    index = 0
    while True:
        sigmas = host.sigmas()
        x = host.start(seed + index)
        prompt = index % host.prompt_count
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            denoised, captures = host.teacher(x, sigma, prompt)
            yield _Point(x, sigma, prompt, denoised, captures)
            x = euler_step(x, denoised, sigma, sigma_next)
        index += 1


def distill(host: DistillHost, student: GSPNLayers, settings: DistillSettings,
            record: TrainingRecord | None = None,
            save: Callable[[TrainingRecord], None] | None = None,
            on_progress: Callable[[int, int], None] | None = None,
            check_interrupt: Callable[[], None] | None = None,
            optimizer: torch.optim.Optimizer | None = None) -> TrainingRecord:
    """Train ``student`` in place for ``settings.steps`` steps, continuing ``record`` (resume).

    ``save(record)`` is called every ``save_every`` steps, at the end, and when anything
    (``check_interrupt`` raising included) stops the run after at least one step, so a
    stopped run leaves a usable checkpoint; the exception is then re-raised. ``optimizer``
    (from :func:`make_optimizer` on ``student``, e.g. with restored state) continues a
    previous run's; by default a fresh one is made.
    """
    record = record or TrainingRecord()
    record.settings = asdict(settings)
    points = trajectory_points(host, settings.seed + 1_000_003 * record.steps)

    def step() -> dict[str, torch.Tensor]:
        point = next(points)
        layer_loss = layer_matching_backward(student, point.captures)
        losses = {LAYER: layer_loss, TOTAL: layer_loss}
        if settings.prediction_weight > 0:
            prediction = host.student(point.x, point.sigma, point.prompt, student)
            prediction_loss = relative_error(prediction, point.denoised)
            (settings.prediction_weight * prediction_loss).backward()
            losses[PREDICTION] = prediction_loss.detach()
            losses[TOTAL] = layer_loss + settings.prediction_weight * losses[PREDICTION]
        return losses

    student.train().requires_grad_(True)
    try:
        return train(step, student.parameters(), optimizer or make_optimizer(student, settings.learning_rate), record,
                     settings.steps, settings.save_every, settings.max_grad_norm, save=save, on_progress=on_progress,
                     check_interrupt=check_interrupt)
    finally:
        student.eval().requires_grad_(False)
