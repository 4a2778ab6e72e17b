"""GSPN distillation inside ComfyUI: the host-free loop of ``models/gspn/distill.py`` driven
through ComfyUI's own sampling machinery (the node and the command line share this), and how its losses read in what
it tells the user while it runs (:mod:`..distill_report`).

The loop runs inside ComfyUI's sampling of the model (:mod:`..training`, shared with CLEAR's
distillation). Each entry of the positive CONDITIONING is one prompt; trajectories take them in
turn.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import comfy.model_management
import comfy.model_patcher
import torch

from ...models.gspn import (Capture, DistillSettings, GSPNConfig, GSPNLayers, LayerSpec, TrainingRecord, distill,
                           load_gspn_weights, load_optimizer_state, make_optimizer, optimizer_path, save_gspn_weights,
                           save_optimizer_state)
from ..distill_report import DistillReport, loss_with_mean, with_report
from ..training import (SamplingContext, TrajectorySettings, inside_sampling, options_clone, output_path,
                        with_weight_copies)
from .patch import comfy_attention_call, gspn_call, model_family, unet_layers

__all__ = ["ComfyDistillHost", "TrajectorySettings", "distill_report", "loss_text", "output_path", "run_distillation",
           "with_host", "with_weight_copies"]


T = TypeVar("T")
PAPER_PROXY_RATIOS = {"SD15": 8, "SDXL": 32}  # layer width / proxy width in the paper's models


class ComfyDistillHost:
    """:class:`~ultrares.models.gspn.distill.DistillHost` over a ComfyUI guider (inside its sampler)."""

    def __init__(self, context: SamplingContext, specs: list[LayerSpec]):
        self.context, self.specs = context, specs
        self.prompt_count = len(context.positive)

    def sigmas(self) -> torch.Tensor:
        return self.context.sigmas

    def start(self, seed: int) -> torch.Tensor:
        return self.context.start(seed)

    def _run(self, x: torch.Tensor, sigma: torch.Tensor, prompt: int, calls: dict[LayerSpec, Callable]):
        options = options_clone(self.context.model_options)
        for spec, call in calls.items():
            options = comfy.model_patcher.set_model_options_patch_replace(options, call, "attn1", *spec.block)
        return self.context.denoise(x, sigma, prompt, options)

    def teacher(self, x: torch.Tensor, sigma: torch.Tensor, prompt: int) -> tuple[torch.Tensor, dict[str, Capture]]:
        calls: dict[str, list[Capture]] = {spec.name: [] for spec in self.specs}

        def capturing(spec: LayerSpec):
            def attn1(q, k, v, extra_options):
                out = comfy_attention_call(q, k, v, extra_options)
                calls[spec.name].append(Capture(q, k, v, out, *extra_options["activations_shape"][-2:]))
                return out
            return attn1

        with torch.no_grad():
            denoised = self._run(x, sigma, prompt, {spec: capturing(spec) for spec in self.specs})
        # cond and uncond may run as separate batches: join them.
        return denoised, {name: Capture(*(torch.cat(parts) for parts in zip(*(c[:4] for c in found))),
                                        *found[0][4:]) for name, found in calls.items() if found}

    def student(self, x: torch.Tensor, sigma: torch.Tensor, prompt: int, gspn: GSPNLayers) -> torch.Tensor:
        return self._run(x, sigma, prompt, {spec: gspn_call(module) for spec, module in gspn.items()})


def with_host(model: comfy.model_patcher.ModelPatcher, positive: list, negative: list | None,
              trajectory: TrajectorySettings, seed: int, run: Callable[[ComfyDistillHost], T]) -> T:
    """Run ``run(host)`` inside ComfyUI's sampling of ``model`` with these prompts; returns its result."""
    specs = unet_layers(model)
    return inside_sampling(model, positive, negative, trajectory, seed,
                           lambda context: run(ComfyDistillHost(context, specs)))


def loss_text(record: TrainingRecord) -> str:
    """The latest losses: ``"loss 0.412 (mean of the last 50: 0.430)"``, the prediction term too."""
    text = loss_with_mean(record.layer_losses)
    if record.prediction_losses:
        text += f", prediction loss {record.prediction_losses[-1]:.4g}"
    return text


def distill_report(path: Path, steps: int, emit: Callable[[str], None],
                   status: Callable[[str, int, int], None] | None = None) -> DistillReport[TrainingRecord]:
    """The report of a GSPN run (its losses in :func:`loss_text`'s words)."""
    return DistillReport(path, steps, loss_text, emit, status)


def run_distillation(model: comfy.model_patcher.ModelPatcher, positive: list, negative: list | None,
                     path: Path, settings: DistillSettings, trajectory: TrajectorySettings,
                     config: GSPNConfig, resume: bool,
                     on_progress: Callable[[int, int], None] | None = None,
                     check_interrupt: Callable[[], None] | None = None,
                     report: DistillReport | None = None) -> tuple[GSPNLayers, TrainingRecord]:
    """Distil GSPN weights for ``model`` into ``path`` (resuming it when asked); returns them.

    ``config.proxy_ratio == 0`` takes the paper's ratio for the model's family (8 elsewhere).
    ``report`` hears every step, every save and the end (a stop is the caller's to report: the
    exception comes out of here after the save).

    The optimiser state is saved next to the weights (``<path>.optimizer``) and restored on
    resume, so a resumed run continues like an unbroken one.

    Runs outside ComfyUI's inference mode: the GSPN parameters, the captured activations and
    (with the final-prediction term) the UNet's weight copies must be usable by autograd.
    """
    family, specs = model_family(model), unet_layers(model)
    if path.exists() and not resume:
        raise FileExistsError(f"{path.name} already exists: turn on resume to continue training it, or choose "
                              "another output name")
    state_path = optimizer_path(path)
    with torch.inference_mode(False), torch.enable_grad():
        if resume and path.exists():
            student, record = load_gspn_weights(path, family, specs)
        else:
            config = config if config.proxy_ratio else replace(config, proxy_ratio=PAPER_PROXY_RATIOS.get(family, 8))
            student, record = GSPNLayers(specs, config), TrainingRecord()
            state_path.unlink(missing_ok=True)  # left by a run whose weights were deleted
        student.to(model.load_device, torch.float32)
        optimizer = make_optimizer(student, settings.learning_rate)
        if record.steps and not load_optimizer_state(state_path, student, optimizer, record.steps):
            logging.warning("GSPN distill: no optimizer state saved with %s at step %d (%s); the optimizer "
                            "starts afresh", path.name, record.steps, state_path.name)
        if settings.prediction_weight > 0:
            model = with_weight_copies(model)

        def save(r: TrainingRecord) -> None:
            save_gspn_weights(path, student, family, r)
            save_optimizer_state(state_path, student, optimizer, r.steps)
            if report is not None:
                report.saved(r)

        def run(host: ComfyDistillHost) -> TrainingRecord:
            return distill(host, student, settings, record, save=save,
                           on_progress=with_report(on_progress, report, record),
                           check_interrupt=check_interrupt, optimizer=optimizer)

        record = with_host(model, positive, negative, trajectory, settings.seed, run)
    student.to(comfy.model_management.intermediate_device())
    if report is not None:
        report.finished(record)
    return student, record

