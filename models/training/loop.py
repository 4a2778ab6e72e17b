"""The optimisation loop every distillation of the pack runs (GSPN's and CLEAR's).

A method supplies one *step*: it draws its own data, runs teacher and student, and
back-propagates its loss terms (each method decides how: GSPN one layer at a time, CLEAR
through its block-wise recomputation). This loop does the rest the same way for both:
clipping, the optimiser step, the loss record, progress, interruption, periodic saves, and a
save when anything stops the run, so that a cancelled run leaves a usable file behind.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

import torch

Step = Callable[[], Mapping[str, torch.Tensor]]
"""One training step's work: zeroed gradients in, gradients accumulated out; returns the step's
loss terms (detached scalars), the optimised total under :data:`TOTAL`."""

TOTAL = "total"


class Optimizer(Protocol):
    """What the loop needs of an optimiser (``torch.optim`` ones, :class:`.offload.OffloadedAdamW`)."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the gradients."""

    def step(self) -> None:
        """Apply the gradients."""


class Record(Protocol):
    """What the loop keeps up to date in a method's training record."""

    steps: int
    finished: bool

    def log(self, losses: Mapping[str, float]) -> None:
        """Append one step's loss terms."""


def train(step: Step, parameters: Iterable[torch.nn.Parameter], optimizer: Optimizer, record: Record,
          steps: int, save_every: int = 0, max_grad_norm: float = 1.0,
          save: Callable[[Record], None] | None = None,
          on_progress: Callable[[int, int], None] | None = None,
          check_interrupt: Callable[[], None] | None = None) -> Record:
    """Run ``steps`` optimiser steps of ``step``, continuing ``record`` (its ``steps`` count on).

    ``parameters`` are the tensors ``optimizer`` updates, whose gradients are clipped to
    ``max_grad_norm`` (0 = no clipping) before each step.

    ``save(record)`` is called every ``save_every`` steps (0 = never in between), at the end,
    and when anything (``check_interrupt`` raising included) stops the run after at least one
    step; the exception is then re-raised. A non-finite total loss stops the run before the
    optimiser applies it, so the saved weights are those of the last good step.
    """
    params = list(parameters)
    record.finished = False
    done = 0
    try:
        while done < steps:
            if check_interrupt is not None:
                check_interrupt()
            optimizer.zero_grad(set_to_none=True)
            losses = {name: float(value) for name, value in step().items()}
            total = losses[TOTAL]
            if not math.isfinite(total):
                raise FloatingPointError(f"distillation loss became {total} at step {record.steps}; "
                                         "lower the learning rate")
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            record.log(losses)
            record.steps += 1
            done += 1
            if on_progress is not None:
                on_progress(done, steps)
            if save is not None and save_every and record.steps % save_every == 0:
                save(record)
    except BaseException:
        if save is not None and done:
            save(record)
        raise
    record.finished = True
    if save is not None:
        save(record)
    return record
