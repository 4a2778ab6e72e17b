"""Distillation: train GSPN modules to reproduce every self-attention output of the model they
will replace, on that model's own sampling trajectories.

The teacher is the unpatched model. It samples trajectories (Euler steps on the host's sigma
schedule, one prompt after another); at every point of a trajectory the teacher's ``attn1``
outputs are recorded, the student (the same model with GSPN in every ``attn1``) runs on the
same input, and the loss is the mean over layers of the relative squared error of the
``attn1`` outputs, optionally plus the error of the final prediction (the paper's recipe
matches layer outputs and predictions). The loop is host-free: a :class:`DistillHost` runs
the model; the ComfyUI node and the command line both drive this same function.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Protocol

import torch

from .layers import GSPNLayers
from .weights import TrainingRecord


class DistillHost(Protocol):
    """What the loop needs from the model being distilled."""

    prompt_count: int

    def sigmas(self) -> torch.Tensor:
        """Noise levels of one sampling trajectory, descending, ending at 0."""

    def start(self, seed: int) -> torch.Tensor:
        """The noisy latent at ``sigmas()[0]`` that a trajectory starts from."""

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, prompt: int, student: GSPNLayers | None,
                record: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's denoised prediction; with ``student``, every ``attn1`` runs GSPN instead.
        Fills ``record`` with each ``attn1`` output, keyed by layer module path."""


@dataclass
class DistillSettings:
    steps: int = 1000                 # optimiser steps in this run
    learning_rate: float = 1e-4
    prediction_weight: float = 0.0    # weight of the final-prediction term (0 = layer outputs only)
    seed: int = 0
    save_every: int = 100             # also saved at the end and when stopped early
    max_grad_norm: float = 1.0


def relative_error(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the teacher's mean square: 1 = as far off as predicting zeros."""
    teacher = teacher.float()
    return (student.float() - teacher).pow(2).mean() / teacher.pow(2).mean().clamp(min=1e-12)


def layer_matching_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over the teacher's ``attn1`` layers of the relative error of the student's output."""
    missing = sorted(set(teacher) - set(student))
    if missing or not teacher:
        raise RuntimeError(f"the student run did not record attn1 outputs for {missing or 'any layer'}")
    return torch.stack([relative_error(student[k], teacher[k]) for k in teacher]).mean()


@dataclass
class _Point:
    x: torch.Tensor
    sigma: torch.Tensor
    prompt: int
    denoised: torch.Tensor
    record: dict[str, torch.Tensor]


def trajectory_points(host: DistillHost, seed: int) -> Iterator[_Point]:
    """The teacher's own sampling trajectories (Euler), one prompt after another, endlessly."""
    index = 0
    while True:
        sigmas = host.sigmas()
        x = host.start(seed + index)
        prompt = index % host.prompt_count
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            record: dict[str, torch.Tensor] = {}
            with torch.no_grad():
                denoised = host.denoise(x, sigma, prompt, None, record)
            yield _Point(x, sigma, prompt, denoised, record)
            x = x + (x - denoised) / sigma * (sigma_next - sigma)
        index += 1


def evaluate(host: DistillHost, student: GSPNLayers, points: int, seed: int) -> float:
    """Mean attn1-matching loss of ``student`` over the first ``points`` points from ``seed``."""
    losses = []
    with torch.no_grad():
        for _, point in zip(range(points), trajectory_points(host, seed)):
            record: dict[str, torch.Tensor] = {}
            host.denoise(point.x, point.sigma, point.prompt, student, record)
            losses.append(layer_matching_loss(record, point.record).item())
    return sum(losses) / len(losses)


def distill(host: DistillHost, student: GSPNLayers, settings: DistillSettings,
            record: TrainingRecord | None = None,
            save: Callable[[TrainingRecord], None] | None = None,
            on_progress: Callable[[int, int], None] | None = None,
            check_interrupt: Callable[[], None] | None = None) -> TrainingRecord:
    """Train ``student`` in place for ``settings.steps`` steps, continuing ``record`` (resume).

    ``save(record)`` is called every ``save_every`` steps, at the end, and when anything
    (``check_interrupt`` raising included) stops the run after at least one step, so a
    stopped run leaves a usable checkpoint; the exception is then re-raised.
    """
    record = record or TrainingRecord()
    record.finished = False
    record.settings = asdict(settings)
    student.train().requires_grad_(True)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    points = trajectory_points(host, settings.seed + 1_000_003 * record.steps)
    done = 0
    try:
        while done < settings.steps:
            if check_interrupt is not None:
                check_interrupt()
            point = next(points)
            student_record: dict[str, torch.Tensor] = {}
            prediction = host.denoise(point.x, point.sigma, point.prompt, student, student_record)
            layer_loss = layer_matching_loss(student_record, point.record)
            loss = layer_loss
            if settings.prediction_weight > 0:
                prediction_loss = relative_error(prediction, point.denoised)
                loss = loss + settings.prediction_weight * prediction_loss
                record.prediction_losses.append(prediction_loss.item())
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"distillation loss became {loss.item()} at step {record.steps}; "
                                         "lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            record.layer_losses.append(layer_loss.item())
            record.steps += 1
            done += 1
            if on_progress is not None:
                on_progress(done, settings.steps)
            if save is not None and settings.save_every and record.steps % settings.save_every == 0:
                save(record)
    except BaseException:
        if save is not None and done:
            save(record)
        raise
    finally:
        student.eval().requires_grad_(False)
    record.finished = True
    if save is not None:
        save(record)
    return record
