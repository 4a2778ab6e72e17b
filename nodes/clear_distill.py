"""The CLEAR Distill node: CLEAR weights for any FLUX.1-layout model, made the way the paper
made the released ones (distilled from the model itself)."""

from __future__ import annotations

import folder_paths
import numpy as np
import torch
from comfy_api.latest import io

from ..models.clear.distill import ATTENTION, FLOW_MATCHING, PREDICTION, ClearDistillSettings, ClearTrainingRecord
from ..models.clear.pattern import ClearPattern
from ..models.training import draw_loss_plot
from .category import CATEGORY
from .clear import apply_clear, load_clear_file
from .clear_distillation import run_clear_distillation
from .distillation import TrajectorySettings, output_path
from .runtime import check_interrupt, progress_callback

FOLDER = "clear"
SCHEDULER = "simple"  # ComfyUI's FLUX workflows sample with the simple scheduler


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


NODES: list[type[io.ComfyNode]] = [UltraResClearDistill]
