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
from ..choices import check_choices, refuse_unlisted
from ..runtime import check_interrupt, progress_callback
from ..training import TrajectorySettings, output_path
from .devices import clear_attention_of, parse_devices, split_over_devices
from .distillation import run_clear_distillation
from .hooks import apply_clear, flux_module, load_clear_file

NO_FILE = "none"
FOLDER = "clear"
SCHEDULER = "simple"  # ComfyUI's FLUX workflows sample with the simple scheduler

log = logging.getLogger(__name__)


def clear_files() -> list[str]:
    """The CLEAR weights in models/clear, then ``none`` (the window without trained weights)."""
    return folder_paths.get_filename_list("clear") + [NO_FILE]


class UltraResClearPatch(io.ComfyNode):
    """Patch a FLUX model with CLEAR's circular-window attention and its fine-tuned weights."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        files = clear_files()
        return io.Schema(
            node_id="UltraResClearPatch",
            display_name="CLEAR attention (FLUX, 2K–8K)",
            category=f"{CATEGORY}/CLEAR",
            description=(
                "Makes FLUX fast at 2K–8K: every part of the picture looks closely at its own neighbourhood and at "
                "the prompt instead of at the whole image, so the work grows with the image size rather than with "
                "its square. Use it for the high-resolution pass: make the image at about 1K, enlarge it, then "
                "re-sample it at 2K and up (denoise about 0.7) through this node, with the CLEAR weights from "
                "models/clear. The defaults are the CLEAR authors' high-resolution settings. "
                "Technical: CLEAR (arXiv 2412.16112) — each image token attends to the image tokens inside a circle "
                "around it, to all text tokens and, with the _down_ files, to a down-sampled copy of the image."),
            inputs=[
                io.Model.Input("model",
                               tooltip="A FLUX.1 model (dev, schnell, Fill, Kontext). This node makes a patched copy; "
                                       "the model you connect stays as it is."),
                io.Combo.Input("clear_weights", display_name="CLEAR weights", options=files, default=files[0],
                               tooltip="The trained CLEAR file from models/clear (Hugging Face: Huage001/CLEAR, or one "
                                       "the CLEAR Distill node made). "
                                       "clear_local_8_down_4 is the authors' choice for 2K; _16 and _32 look "
                                       "further and are slower. 'none' uses the window without trained weights: "
                                       "the picture suffers, only for experiments."),
                io.Int.Input("window_radius", display_name="window radius (0 = the file's)", default=0, min=0,
                             max=1024,
                             tooltip="How far each part of the picture looks, in 16-px steps (8 = 128 px). Keep 0: "
                                     "the file's own radius, the only one its weights were trained for (needed with "
                                     "'none' and files that do not say theirs; a file made for another radius is "
                                     "refused). Technical: a token sees the tokens with dy² + dx² < r²."),
                io.Int.Input("down_factor", display_name="summary cells (0 = the file's)", default=0, min=0, max=64,
                             tooltip="Besides its neighbourhood, every part also sees a coarse summary of the whole "
                                     "picture, in cells of this many tokens per side (4 = 64 px): it keeps large "
                                     "shapes consistent and avoids repeated patterns. 1 = no summary; keep 0: the "
                                     "file's own. Technical: d × d down-sampled keys and values."),
                io.Float.Input("ntk_factor", display_name="position stretch (NTK)", default=10.0, min=1.0, max=100.0,
                               step=0.5,
                               tooltip="Stretches FLUX's sense of position so it copes with images larger than it "
                                       "was trained for: 10 for 2K and up, as in the authors' high-resolution "
                                       "recipe; 1 = unchanged (their setting for 1K images). Technical: multiplies "
                                       "the RoPE base (theta) of every axis, for every call of the patched model."),
                io.Boolean.Input("proportional_attention", display_name="keep focus at high resolution",
                                 default=True,
                                 tooltip="Keeps attention as focused at 2K–8K as at 1K, so detail stays crisp: on in "
                                         "the authors' high-resolution recipe; off = FLUX's usual attention (their "
                                         "1K setting). Technical: proportional attention, softmax scale "
                                         "sqrt(log_4608(N) / head_dim), N = tokens (x10 with the summary cells)."),
                io.Int.Input("min_image_tokens", display_name="use CLEAR above (image tokens)", default=0, min=0,
                             max=1 << 24,
                             tooltip="Smaller images get FLUX's full attention instead (CLEAR saves little below "
                                     "~2K). Image tokens = width/16 × height/16: 4096 = 1024×1024, 16384 = "
                                     "2048×2048. 0 = CLEAR at every size, as the authors run it. Below it the file's "
                                     "weights and the position stretch still apply, so the picture differs from "
                                     "the unpatched model's."),
                io.Combo.Input("backend", display_name="compute backend", options=list(BACKENDS), default="auto",
                               tooltip="How the attention is computed; the picture is the same. auto: the Triton "
                                       "kernel for bfloat16/float16 models on the GPUs it was built and checked for "
                                       "(RTX 30/40, A100, L4/L40, H100), the exact PyTorch path elsewhere (float32, "
                                       "older GPUs, CPU); torch/triton force one (triton says why when it cannot "
                                       "run)."),
            ],
            outputs=[io.Model.Output(tooltip="The patched FLUX model.")],
        )

    @classmethod
    def validate_inputs(cls, clear_weights: str | None = None) -> bool | str:
        return refuse_unlisted(cls, {"clear_weights": clear_weights}, {
            "clear_weights": "put the CLEAR file into models/clear (Hugging Face: Huage001/CLEAR), then press R to "
                             "refresh the lists"})

    @classmethod
    def execute(cls, model, clear_weights: str, window_radius: int, down_factor: int, ntk_factor: float,
                proportional_attention: bool, min_image_tokens: int, backend: str) -> io.NodeOutput:
        check_choices(cls, backend=backend)
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
                "Shares the sampling of a CLEAR-patched FLUX between GPUs: each GPU works on a horizontal band of "
                "the picture, and the picture is exactly the one a single GPU makes. Every GPU needs room for the "
                "whole model; the memory for the image itself is shared out. Technical: each GPU holds a copy of the "
                "model and computes its stripe of tokens; per attention layer the GPUs exchange only the key rows "
                "within CLEAR's window of their stripe's edges and a few numbers per text token."),
            inputs=[
                io.Model.Input("model", display_name="model (after CLEAR)",
                               tooltip="A FLUX model from the CLEAR attention node."),
                io.String.Input("devices", display_name="GPUs", default="auto",
                                tooltip="Which GPUs share the work, ComfyUI's own GPU first, e.g. cuda:0,cuda:1,cuda:2. "
                                        "auto = every GPU. One GPU = the usual single-GPU run. cpu,cpu runs two CPU "
                                        "ranks (for tests)."),
            ],
            outputs=[io.Model.Output(tooltip="The model, sampling on the listed GPUs together.")],
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
