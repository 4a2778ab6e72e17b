"""GSPN distillation inside ComfyUI: the host-free loop of ``models/gspn/distill.py`` driven
through ComfyUI's own sampling machinery (the node and the command line share this), and what it tells the user while
it runs (:class:`DistillReport`: losses now and then, every save with its path, how it ended).

The loop runs inside a custom ``comfy.samplers.Sampler`` handed to a ``CFGGuider``, like
ComfyUI's own LoRA trainer: the guider loads the model, turns the CONDITIONING into model
inputs (SDXL's size conditioning included) and applies CFG; the loop only calls it. Each
entry of the positive CONDITIONING is one prompt; trajectories take them in turn.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import comfy.model_management
import comfy.model_patcher
import comfy.samplers
import torch

from ...models.gspn import (Capture, DistillSettings, GSPNConfig, GSPNLayers, LayerSpec, TrainingRecord, distill,
                           load_gspn_weights, load_optimizer_state, make_optimizer, optimizer_path, save_gspn_weights,
                           save_optimizer_state)
from .patch import comfy_attention_call, gspn_call, model_family, unet_layers


T = TypeVar("T")
PAPER_PROXY_RATIOS = {"SD15": 8, "SDXL": 32}  # layer width / proxy width in the paper's models


@dataclass
class TrajectorySettings:
    width: int = 512
    height: int = 512
    batch_size: int = 1
    sampling_steps: int = 20
    cfg: float = 7.0
    scheduler: str = "normal"


class ComfyDistillHost:
    """:class:`~ultrares.models.gspn.distill.DistillHost` over a ComfyUI guider (inside its sampler)."""

    def __init__(self, guider: comfy.samplers.CFGGuider, sampler: comfy.samplers.Sampler, sigmas: torch.Tensor,
                 extra_args: dict, noise: torch.Tensor, specs: list[LayerSpec]):
        self.guider, self.extra_args, self.specs = guider, extra_args, specs
        self.positive = list(guider.conds["positive"])
        self.prompt_count = len(self.positive)
        self._sigmas = sigmas
        self._max_denoise = sampler.max_denoise(guider, sigmas)
        self.shape, self.device = noise.shape, noise.device

    def sigmas(self) -> torch.Tensor:
        return self._sigmas

    def start(self, seed: int) -> torch.Tensor:
        noise = torch.randn(self.shape, generator=torch.Generator().manual_seed(seed)).to(self.device)
        return self.guider.inner_model.model_sampling.noise_scaling(self._sigmas[0], noise, torch.zeros_like(noise),
                                                                    self._max_denoise)

    def _run(self, x: torch.Tensor, sigma: torch.Tensor, prompt: int, calls: dict[LayerSpec, Callable]):
        self.guider.conds["positive"] = [self.positive[prompt]]
        options = comfy.model_patcher.create_model_options_clone(self.extra_args["model_options"])
        for spec, call in calls.items():
            options = comfy.model_patcher.set_model_options_patch_replace(options, call, "attn1", *spec.block)
        return self.guider(x, x.new_full((x.shape[0],), float(sigma)), model_options=options,
                           seed=self.extra_args.get("seed"))

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


class _HostSampler(comfy.samplers.Sampler):
    """Calls ``run(host)`` where a sampler would sample (the guider calls it) and keeps the result."""

    def __init__(self, run: Callable[[ComfyDistillHost], object], specs: list[LayerSpec]):
        self.run, self.specs = run, specs
        self.result = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        self.result = self.run(ComfyDistillHost(model_wrap, self, sigmas, extra_args, noise, self.specs))
        return torch.zeros_like(noise)


def _zeroed(conditioning: list) -> list:
    """An empty-prompt stand-in for a missing negative: the first positive entry, all zeros."""
    cond, extras = conditioning[0]
    return [[torch.zeros_like(cond), {k: torch.zeros_like(v) if torch.is_tensor(v) else v for k, v in extras.items()}]]


def with_host(model: comfy.model_patcher.ModelPatcher, positive: list, negative: list | None,
              trajectory: TrajectorySettings, seed: int, run: Callable[[ComfyDistillHost], T]) -> T:
    """Run ``run(host)`` inside ComfyUI's sampling of ``model`` with these prompts; returns its result."""
    specs = unet_layers(model)
    sampler = _HostSampler(run, specs)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative if negative else _zeroed(positive))
    guider.set_cfg(trajectory.cfg)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), trajectory.scheduler,
                                             trajectory.sampling_steps)
    channels = model.get_model_object("latent_format").latent_channels
    latent = torch.zeros(trajectory.batch_size, channels, trajectory.height // 8, trajectory.width // 8)
    guider.sample(torch.zeros_like(latent), latent, sampler, sigmas, disable_pbar=True, seed=seed)
    return sampler.result


def with_weight_copies(model: comfy.model_patcher.ModelPatcher) -> comfy.model_patcher.ModelPatcher:
    """A clone whose layers use a fresh copy of each weight on every call, owned by autograd.

    The final-prediction term back-propagates through the frozen UNet, which keeps each layer's
    weight for the backward pass. ComfyUI's weights cannot be kept as they are: those created
    under ``torch.inference_mode`` are refused by autograd, and the weights ComfyUI's ops cast
    for a call may live in a cast buffer that the next layer's cast overwrites (the shared
    per-stream buffers of low-VRAM offloading and of Dynamic VRAM, where nothing tells autograd
    the memory changed: the gradients would silently be wrong). A weight wrapper makes ComfyUI's
    ops run it on every cast weight; it returns a copy of its own, made here outside inference
    mode. The wrappers live on the clone only, so the caller's model is untouched.
    """
    copying = model.clone()
    for name, module in model.get_model_object("diffusion_model").named_modules():
        if hasattr(module, "weight_function"):
            for kind in ("weight", "bias"):
                if getattr(module, kind, None) is not None:
                    copying.add_weight_wrapper(f"diffusion_model.{name}.{kind}", _own_copy)
    return copying


def _own_copy(weight: torch.Tensor) -> torch.Tensor:
    return weight.clone()


def output_path(folder: str | os.PathLike, name: str) -> Path:
    """``<folder>/<name>.safetensors``; refuses names that would leave the folder."""
    name = name.strip()
    if not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"output name {name!r} must be a plain file name (no folders)")
    return Path(folder) / (name if name.endswith(".safetensors") else name + ".safetensors")


LOG_LINES = 20
"""Loss lines a run logs (besides every save and the end), evenly spread over its steps."""
LOSS_WINDOW = 50
"""Steps the logged mean loss is taken over (single steps are noisy: each is one noise level)."""


def loss_text(record: TrainingRecord) -> str:
    """The latest losses: ``"loss 0.412 (mean of the last 50: 0.430)"``, the prediction term too."""
    recent = record.layer_losses[-LOSS_WINDOW:]
    text = f"loss {record.layer_losses[-1]:.4g}"
    if len(recent) > 1:
        text += f" (mean of the last {len(recent)}: {sum(recent) / len(recent):.4g})"
    if record.prediction_losses:
        text += f", prediction loss {record.prediction_losses[-1]:.4g}"
    return text


class DistillReport:
    """What a distillation tells the user: ``emit`` gets log lines (the losses :data:`LOG_LINES`
    times per run, every save with its path, the end or the stop), ``status(text, done, total)``
    (optional) the latest loss after every step."""

    def __init__(self, path: Path, steps: int, emit: Callable[[str], None],
                 status: Callable[[str, int, int], None] | None = None):
        self.path, self.steps, self.emit, self.status = path, steps, emit, status
        self.every = max(1, steps // LOG_LINES)
        self.saved_step: int | None = None
        self.done = 0

    def step(self, done: int, total: int, record: TrainingRecord) -> None:
        self.done = done
        if self.status is not None:
            saved = f" · saved at step {self.saved_step}" if self.saved_step is not None else ""
            self.status(f"step {done}/{total} · {loss_text(record)}{saved}", done, total)
        if done % self.every == 0 and done < total:
            self.emit(f"step {done}/{total} (step {record.steps} of the file): {loss_text(record)}")

    def saved(self, record: TrainingRecord) -> None:
        self.saved_step = record.steps
        self.emit(f"saved step {record.steps} to {self.path}")

    def finished(self, record: TrainingRecord) -> None:
        self.emit(f"finished {self.done} steps ({record.steps} in the file): {loss_text(record)}; "
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

        def progress(done: int, total: int) -> None:
            if on_progress is not None:
                on_progress(done, total)
            if report is not None:
                report.step(done, total, record)

        def run(host: ComfyDistillHost) -> TrainingRecord:
            return distill(host, student, settings, record, save=save, on_progress=progress,
                           check_interrupt=check_interrupt, optimizer=optimizer)

        record = with_host(model, positive, negative, trajectory, settings.seed, run)
    student.to(comfy.model_management.intermediate_device())
    if report is not None:
        report.finished(record)
    return student, record

