"""What the GSPN and CLEAR distillations share inside ComfyUI: the teacher run through
ComfyUI's own sampling machinery, weights autograd can use, and the output file name.

The host-free loops run inside a custom ``comfy.samplers.Sampler`` handed to a ``CFGGuider``,
like ComfyUI's own LoRA trainer: the guider loads the model, turns the CONDITIONING into
model inputs (SDXL's size conditioning, FLUX's guidance included) and applies CFG; the loops
only call it (:class:`SamplingContext`). Each entry of the positive CONDITIONING is one prompt.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import comfy.model_patcher
import comfy.samplers
import torch

T = TypeVar("T")


@dataclass
class TrajectorySettings:
    """The teacher's sampling: image size, images per trajectory, steps, CFG and scheduler."""

    width: int = 512
    height: int = 512
    batch_size: int = 1
    sampling_steps: int = 20
    cfg: float = 7.0
    scheduler: str = "normal"


class SamplingContext:
    """The guider, sigmas and noise shape of one ComfyUI sampling call, for a distillation host."""

    def __init__(self, guider: comfy.samplers.CFGGuider, sampler: comfy.samplers.Sampler, sigmas: torch.Tensor,
                 extra_args: dict, noise: torch.Tensor):
        self.guider, self.sigmas, self.extra_args = guider, sigmas, extra_args
        self.positive = list(guider.conds["positive"])
        self.max_denoise = sampler.max_denoise(guider, sigmas)
        self.shape, self.device = noise.shape, noise.device

    @property
    def model_options(self) -> dict:
        """The model options this sampling call runs with (the patcher's, wrappers included)."""
        return self.extra_args["model_options"]

    def start(self, seed: int) -> torch.Tensor:
        """Seeded noise, scaled to the first sigma as the model's sampling defines it."""
        noise = torch.randn(self.shape, generator=torch.Generator().manual_seed(seed)).to(self.device)
        return self.guider.inner_model.model_sampling.noise_scaling(self.sigmas[0], noise, torch.zeros_like(noise),
                                                                    self.max_denoise)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, prompt: int, options: dict,
                cfg: float | None = None) -> torch.Tensor:
        """The guider's denoised prediction for prompt ``prompt`` with ``options`` as model options;
        ``cfg`` replaces the guider's CFG scale for this call (1 = the prompt alone, one pass)."""
        self.guider.conds["positive"] = [self.positive[prompt]]
        scale = self.guider.cfg
        if cfg is not None:
            self.guider.cfg = cfg
        try:
            return self.guider(x, x.new_full((x.shape[0],), float(sigma)), model_options=options,
                               seed=self.extra_args.get("seed"))
        finally:
            self.guider.cfg = scale


def options_clone(options: dict) -> dict:
    """A copy of model options whose patch and wrapper dicts can be changed freely."""
    return comfy.model_patcher.create_model_options_clone(options)


class _HostSampler(comfy.samplers.Sampler):
    """Calls ``run(context)`` where a sampler would sample (the guider calls it) and keeps the result."""

    def __init__(self, run: Callable[[SamplingContext], object]):
        self.run = run
        self.result = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        self.result = self.run(SamplingContext(model_wrap, self, sigmas, extra_args, noise))
        return torch.zeros_like(noise)


def _zeroed(conditioning: list) -> list:
    """An empty-prompt stand-in for a missing negative: the first positive entry, all zeros."""
    cond, extras = conditioning[0]
    return [[torch.zeros_like(cond), {k: torch.zeros_like(v) if torch.is_tensor(v) else v for k, v in extras.items()}]]


def inside_sampling(model: comfy.model_patcher.ModelPatcher, positive: list, negative: list | None,
                    trajectory: TrajectorySettings, seed: int, run: Callable[[SamplingContext], T]) -> T:
    """Run ``run(context)`` inside ComfyUI's sampling of ``model`` with these prompts; returns its result."""
    sampler = _HostSampler(run)
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
    """A clone whose layers use a fresh copy of each weight on every differentiable call, owned by autograd.

    A loss that back-propagates through the frozen network keeps each layer's weight for the
    backward pass. ComfyUI's weights cannot be kept as they are: those created under
    ``torch.inference_mode`` are refused by autograd, and the weights ComfyUI's ops cast for a
    call may live in a cast buffer that the next layer's cast overwrites (the shared per-stream
    buffers of low-VRAM offloading and of Dynamic VRAM, where nothing tells autograd the memory
    changed: the gradients would silently be wrong). A weight wrapper makes ComfyUI's ops run it
    on every cast weight; it returns a copy of its own, made here outside inference mode (calls
    without gradients keep the weight as it is). The wrappers live on the clone only, so the
    caller's model is untouched.
    """
    copying = model.clone()
    for name, module in model.get_model_object("diffusion_model").named_modules():
        if hasattr(module, "weight_function"):
            for kind in ("weight", "bias"):
                if getattr(module, kind, None) is not None:
                    copying.add_weight_wrapper(f"diffusion_model.{name}.{kind}", _own_copy)
    return copying


def _own_copy(weight: torch.Tensor) -> torch.Tensor:
    return weight.clone() if torch.is_grad_enabled() else weight


def output_path(folder: str | os.PathLike, name: str) -> Path:
    """``<folder>/<name>.safetensors``; refuses names that would leave the folder."""
    name = name.strip()
    if not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"output name {name!r} must be a plain file name (no folders)")
    return Path(folder) / (name if name.endswith(".safetensors") else name + ".safetensors")
