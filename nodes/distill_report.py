"""What a distillation (GSPN's or CLEAR's) tells the user while it runs: its losses now and then,
every save with its path, and how it ended (finished, cancelled, stopped by an error: what is
saved and how to resume). The node shows the same lines as progress text; the command lines
print them.

Each method says how its losses read (``describe(record)``); both records count their optimiser
steps in ``record.steps``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Generic, Protocol, TypeVar

import comfy.model_management

from .runtime import NodeFeedback

__all__ = ["LOG_LINES", "LOSS_WINDOW", "DistillReport", "loss_with_mean", "report_stop", "with_report"]

LOG_LINES = 20
"""Loss lines a run logs (besides every save and the end), evenly spread over its steps."""
LOSS_WINDOW = 50
"""Steps the logged mean loss is taken over (single steps are noisy: each is one noise level)."""


def loss_with_mean(losses: list[float]) -> str:
    """The latest of ``losses`` and their recent mean: ``"loss 0.412 (mean of the last 50: 0.430)"``."""
    recent = losses[-LOSS_WINDOW:]
    text = f"loss {recent[-1]:.4g}"
    if len(recent) > 1:
        text += f" (mean of the last {len(recent)}: {sum(recent) / len(recent):.4g})"
    return text


class _Record(Protocol):
    steps: int


R = TypeVar("R", bound=_Record)


class DistillReport(Generic[R]):
    """``emit`` gets log lines (the losses :data:`LOG_LINES` times per run, every save with its
    path, the end or the stop), ``status(text, done, total)`` (optional) the latest loss after
    every step; ``describe(record)`` words the latest losses."""

    def __init__(self, path: Path, steps: int, describe: Callable[[R], str], emit: Callable[[str], None],
                 status: Callable[[str, int, int], None] | None = None):
        self.path, self.steps, self.describe, self.emit, self.status = path, steps, describe, emit, status
        self.every = max(1, steps // LOG_LINES)
        self.saved_step: int | None = None
        self.done = 0

    def step(self, done: int, total: int, record: R) -> None:
        self.done = done
        if self.status is not None:
            saved = f" · saved at step {self.saved_step}" if self.saved_step is not None else ""
            self.status(f"step {done}/{total} · {self.describe(record)}{saved}", done, total)
        if done % self.every == 0 and done < total:
            self.emit(f"step {done}/{total} (step {record.steps} of the file): {self.describe(record)}")

    def saved(self, record: R) -> None:
        self.saved_step = record.steps
        self.emit(f"saved step {record.steps} to {self.path}")

    def finished(self, record: R) -> None:
        self.emit(f"finished {self.done} steps ({record.steps} in the file): {self.describe(record)}; "
                  f"the weights are in {self.path}")

    def stopped(self, reason: str) -> str:
        """Say (and return) how a stopped run left the file: ``reason`` is e.g. ``"cancelled"``."""
        if self.saved_step is None:
            text = f"{reason} before the first step finished: nothing was saved"
        else:
            text = (f"{reason} after {self.done} of {self.steps} steps: the weights so far (step {self.saved_step}) "
                    f"are saved in {self.path}; turn on resume to continue training them")
        self.emit(text)
        return text


def with_report(on_progress: Callable[[int, int], None] | None, report: DistillReport[R] | None,
                record: R) -> Callable[[int, int], None]:
    """A ``(done, total)`` callback for the training loop that moves ``on_progress`` and tells
    ``report`` about each step of ``record`` (the record the loop fills in)."""
    def progress(done: int, total: int) -> None:
        if on_progress is not None:
            on_progress(done, total)
        if report is not None:
            report.step(done, total, record)

    return progress


def report_stop(error: BaseException, report: DistillReport, feedback: NodeFeedback) -> None:
    """Show on the node how a run that raised ``error`` left its file (a cancel, or an error after
    a save); the caller re-raises."""
    # A cancel is ComfyUI's InterruptProcessingException (a BaseException on newer hosts).
    cancelled = (isinstance(error, comfy.model_management.InterruptProcessingException)
                 or not isinstance(error, Exception))
    if cancelled or report.saved_step is not None:
        reason = "cancelled" if cancelled else f"stopped by an error ({type(error).__name__})"
        feedback.finish(report.stopped(reason), logged=False)
