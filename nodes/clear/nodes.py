"""The CLEAR nodes: their inputs, tooltips and what they do with them (the hooks are in :mod:`.hooks`,
the split over several devices in :mod:`.devices`, the distillation's ComfyUI host in
:mod:`.distillation`)."""

from __future__ import annotations

import logging

import folder_paths
import numpy as np
import torch
from comfy_api.latest import io

from ...models.clear import (ATTENTION, BACKENDS, FLOW_MATCHING, PREDICTION, ClearDistillSettings, ClearPattern,
                             ClearTrainingRecord, resolve_pattern)
from ...models.training import draw_loss_plot
from ..category import CATEGORY
from ..runtime import check_interrupt, progress_callback
from ..training import TrajectorySettings, output_path
from .devices import clear_attention_of, parse_devices, split_over_devices
from .distillation import run_clear_distillation
from .hooks import apply_clear, flux_module, load_clear_file

NO_FILE = "none"
FOLDER = "clear"
SCHEDULER = "simple"  # ComfyUI's FLUX workflows sample with the simple scheduler

log = logging.getLogger(__name__)


class UltraResClearPatch(io.ComfyNode):
    """Patch a FLUX model with CLEAR's circular-window attention and its fine-tuned weights."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UltraResClearPatch",
            display_name="CLEAR attention (FLUX)",
            category=f"{CATEGORY}/CLEAR",
            description=(
                "CLEAR (arXiv 2412.16112): every image token attends only to the image tokens inside a "
                "circle around it, to all text tokens and, in the _down_ variants, to a learned down-sampled "
                "copy of the image; attention cost then grows linearly with the image size. Loads the "
                "fine-tuned attention weights from models/clear. For 2K-8K: generate at ~1K, upscale, then "
                "img2img with this patch (the reference uses ntk_factor 10 and proportional attention there)."),
            inputs=[
                io.Model.Input("model", tooltip="A FLUX model (FLUX.1-dev, the model CLEAR was distilled from)."),
                io.Combo.Input("clear_weights", options=[NO_FILE] + folder_paths.get_filename_list("clear"),
                               default=NO_FILE,
                               tooltip="A released CLEAR file (clear_local_<r>[_down_<d>].safetensors) or one the "
                                       "CLEAR Distill node made, from models/clear. 'none' applies the window "
                                       "without the fine-tuned weights: the model was not trained for it and "
                                       "quality drops; use the weights."),
                io.Int.Input("window_radius", default=0, min=0, max=1024,
                             tooltip="Radius r in image tokens (16 px each): a token sees the tokens with "
                                     "dy^2 + dx^2 < r^2. 0 = the file's radius (needed with 'none' and files that do "
                                     "not say theirs); a file made for another radius is refused."),
                io.Int.Input("down_factor", default=0, min=0, max=64,
                             tooltip="Size d of the d x d cells of the down-sampled keys; 1 = none. "
                                     "0 = the file's factor (1 with 'none'); a file made for another is refused."),
                io.Float.Input("ntk_factor", default=1.0, min=1.0, max=100.0, step=0.5,
                               tooltip="Multiplies the RoPE base (theta) of every axis for every call of this "
                                       "model; the reference's high-resolution recipe uses 10. 1 = unchanged."),
                io.Boolean.Input("proportional_attention", default=False,
                                 tooltip="Softmax scale sqrt(log_4608(N) / head_dim) with N the number of tokens "
                                         "(x10 with down-sampled keys), as in the reference's high-resolution "
                                         "recipe; off = 1/sqrt(head_dim)."),
                io.Int.Input("min_image_tokens", default=0, min=0, max=1 << 24,
                             tooltip="Use CLEAR attention only when the image has more than this many tokens "
                                     "(width/16 x height/16); smaller images get the model's full attention, "
                                     "with the file's weights and the NTK factor still applied (the weights were "
                                     "tuned for the window, so results there differ from CLEAR's). CLEAR saves "
                                     "little below ~2K: at 1024x1024 (4096 tokens) radius 16 still costs a third "
                                     "of full attention. 0 = CLEAR at every size, as in the reference."),
                io.Combo.Input("backend", options=list(BACKENDS), default="auto",
                               tooltip="auto: the Triton kernel for bfloat16/float16 models on the GPUs it was "
                                       "built and checked for (RTX 30/40, A100, L4/L40, H100), the exact tiled "
                                       "PyTorch path elsewhere (float32, older GPUs, CPU); torch/triton force one "
                                       "(triton says why when it cannot run)."),
            ],
            outputs=[io.Model.Output(tooltip="The patched FLUX model.")],
        )

    @classmethod
    def execute(cls, model, clear_weights: str, window_radius: int, down_factor: int, ntk_factor: float,
                proportional_attention: bool, min_image_tokens: int, backend: str) -> io.NodeOutput:
        flux_module(model)
        weights, metadata, filename = None, {}, None
        if clear_weights != NO_FILE:
            filename = clear_weights
            weights, metadata = load_clear_file(model, clear_weights)
        pattern = resolve_pattern(filename, metadata, weights.spatial_size if weights else None,
                                  radius=window_radius, down_factor=down_factor)
        return io.NodeOutput(apply_clear(model, pattern, weights, ntk_factor, proportional_attention,
                                         min_image_tokens, backend))


class UltraResClearDevices(io.ComfyNode):
    """Run a CLEAR-patched FLUX stripe-parallel on several GPUs during sampling."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UltraResClearDevices",
            display_name="CLEAR on several GPUs",
            category=f"{CATEGORY}/CLEAR",
            description=(
                "Splits the image into horizontal stripes, one per GPU, for a FLUX patched by the CLEAR attention "
                "node. Each GPU holds a copy of the model and computes its stripe; per attention layer the GPUs "
                "exchange only the rows of keys within CLEAR's window of their stripe's edges and a few numbers per "
                "text token, so the result is exactly the one-GPU result. Needs the full model's memory on every "
                "GPU; the activation memory per GPU shrinks with the stripe."),
            inputs=[
                io.Model.Input("model", tooltip="A FLUX model from the CLEAR attention (FLUX) node."),
                io.String.Input("devices", default="auto",
                                tooltip="The GPUs to use, ComfyUI's own GPU first, e.g. cuda:0,cuda:1,cuda:2. "
                                        "auto = every CUDA GPU. One device = the normal single-GPU run. "
                                        "cpu,cpu runs two CPU ranks (for tests)."),
            ],
            outputs=[io.Model.Output(tooltip="The model, sampling stripe-parallel on the listed devices.")],
        )

    @classmethod
    def execute(cls, model, devices: str) -> io.NodeOutput:
        clear_attention_of(model)
        listed = parse_devices(devices, torch.device(model.load_device))
        if len(listed) == 1:
            log.info("CLEAR on several GPUs: one device (%s) listed, the model runs as it is", listed[0])
        return io.NodeOutput(split_over_devices(model, listed))


class UltraResClearDistill(io.ComfyNode):
    """Distils CLEAR weights for a FLUX model from that model's own samples."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UltraResClearDistill",
            display_name="CLEAR Distill (make CLEAR weights)",
            category=f"{CATEGORY}/CLEAR",
            description="Fine-tunes the attention projections of a FLUX model (FLUX.1-dev/schnell, fine-tunes, merges) "
                        "so that it works with CLEAR's circular-window attention, as the CLEAR paper made its "
                        "released weights: the model itself samples your prompts, and the student (the same model "
                        "with CLEAR attention) learns to match its predictions and attention outputs. Saves "
                        "models/clear/<output_name>.safetensors in the released files' layout every few steps, at "
                        "the end and when cancelled, and can resume it. Outputs the patched model and the loss curve.",
            inputs=[
                io.Model.Input("model", tooltip="The FLUX model to distil: the teacher, and the student's starting "
                                                "point (its LoRAs and other patches included)."),
                io.Conditioning.Input("positive", tooltip="Training prompts. Each entry is one prompt: join several "
                                                          "with Conditioning (Combine); the teacher's samples take "
                                                          "them in turn. FLUX.1-dev wants its guidance set with "
                                                          "FluxGuidance (3.5, as the paper's training)."),
                io.String.Input("output_name", default="clear_local_16_distilled",
                                tooltip="File name in models/clear (.safetensors is added)."),
                io.Int.Input("window_radius", default=16, min=1, max=1024,
                             tooltip="Radius r in image tokens (16 px each) of the window the weights are made for: "
                                     "a token sees the tokens with dy^2 + dx^2 < r^2. The released files use 8, 16, "
                                     "32. Fixed for the file once created."),
                io.Int.Input("down_factor", default=1, min=1, max=64,
                             tooltip="Cell size d of the down-sampled keys (the released _down_4 files use 4); "
                                     "1 = none. Fixed for the file once created."),
                io.Int.Input("steps", default=1000, min=1, max=1_000_000,
                             tooltip="Optimiser steps in this run (the paper: 10K)."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-6,
                               tooltip="AdamW learning rate (the reference's default 1e-4)."),
                io.Int.Input("resolution", default=1024, min=256, max=4096, step=16,
                             tooltip="Side of the square training images (the paper: 1024)."),
                io.Int.Input("batch_size", default=1, min=1, max=256,
                             tooltip="Teacher samples per optimiser step, run one after another with their "
                                     "gradients added (memory of one; the reference's effective batch is 32)."),
                io.Int.Input("teacher_samples", default=1000, min=1, max=1_000_000,
                             tooltip="How many samples the teacher makes (the paper: 10K); training draws them in "
                                     "a new order each pass, at a random noise level each time. Kept in "
                                     "models/clear/<output_name>.safetensors.samples/ for resuming."),
                io.Int.Input("sampling_steps", default=20, min=1, max=200,
                             tooltip="Steps of each teacher trajectory (Euler, simple scheduler)."),
                io.Float.Input("cfg", default=1.0, min=1.0, max=30.0, step=0.1,
                               tooltip="CFG of the teacher trajectories (1 for FLUX.1, whose guidance is in the "
                                       "conditioning; >1 runs the negative too). Training predictions use the "
                                       "prompt alone, as the reference."),
                io.Float.Input("flow_matching_weight", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Weight of the flow-matching loss on the teacher's samples (reference: 1)."),
                io.Float.Input("prediction_weight", default=0.5, min=0.0, max=10.0, step=0.05,
                               tooltip="Weight of matching the teacher's prediction (reference: 0.5)."),
                io.Float.Input("attention_weight", default=0.5, min=0.0, max=10.0, step=0.05,
                               tooltip="Weight of matching the teacher's attention outputs in every 4th attention "
                                       "layer (single blocks 1, 5, ..., 37; reference: 0.5)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the teacher's samples and of the training draws."),
                io.Boolean.Input("resume", default=False,
                                 tooltip="Continue training the existing file of this name (same radius and down "
                                         "factor), with its optimizer state and samples."),
                io.Int.Input("save_every", default=100, min=0, max=1_000_000,
                             tooltip="Save every this many steps (0 = only at the end or when cancelled)."),
                io.Boolean.Input("optimizer_on_cpu", default=False,
                                 tooltip="Keep AdamW's float32 values, gradients and moments in RAM (16 bytes per "
                                         "trained parameter: 27 GiB for FLUX.1) and only bf16 copies on the GPU: "
                                         "what lets a 24 GB GPU distil FLUX.1 (with fp8 weights). Each step moves "
                                         "the gradients to RAM and the new values back."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Negative prompt of the teacher trajectories when cfg > 1 "
                                              "(default: empty)."),
            ],
            outputs=[io.Model.Output(tooltip="The model patched with the distilled file, as the CLEAR attention "
                                             "node would load it."),
                     io.Image.Output(tooltip="Loss curves (flow matching, prediction, attention).")],
        )

    @classmethod
    def execute(cls, model, positive, output_name: str, window_radius: int, down_factor: int, steps: int,
                learning_rate: float, resolution: int, batch_size: int, teacher_samples: int, sampling_steps: int,
                cfg: float, flow_matching_weight: float, prediction_weight: float, attention_weight: float,
                seed: int, resume: bool, save_every: int, optimizer_on_cpu: bool,
                negative=None) -> io.NodeOutput:
        path = output_path(folder_paths.get_folder_paths(FOLDER)[0], output_name)
        pattern = ClearPattern(window_radius, down_factor)
        settings = ClearDistillSettings(steps=steps, learning_rate=learning_rate, batch_size=batch_size,
                                        samples=teacher_samples, flow_matching_weight=flow_matching_weight,
                                        prediction_weight=prediction_weight, attention_weight=attention_weight,
                                        seed=seed, save_every=save_every, optimizer_on_cpu=optimizer_on_cpu)
        trajectory = TrajectorySettings(width=resolution, height=resolution, sampling_steps=sampling_steps, cfg=cfg,
                                        scheduler=SCHEDULER)
        _, record = run_clear_distillation(model, positive, negative, path, pattern, settings, trajectory, resume,
                                           on_progress=progress_callback(steps), check_interrupt=check_interrupt)
        weights, _ = load_clear_file(model, path.name)
        return io.NodeOutput(apply_clear(model, pattern, weights), loss_image(record))


def loss_image(record: ClearTrainingRecord) -> torch.Tensor:
    """The record's loss curves as a ComfyUI IMAGE ``[1, H, W, 3]`` in 0..1."""
    series = {name: record.losses[name] for name in (FLOW_MATCHING, PREDICTION, ATTENTION) if name in record.losses}
    plot = draw_loss_plot(series)
    return torch.from_numpy(plot.astype(np.float32) / 255.0)[None]


NODES: list[type[io.ComfyNode]] = [UltraResClearPatch, UltraResClearDevices, UltraResClearDistill]
