"""GSPN nodes: patch a SD1.5/SDXL model with GSPN weights, and distil those weights from the
model itself (no text-to-image GSPN weights are public)."""

from __future__ import annotations

import folder_paths
import numpy as np
import torch
from comfy_api.latest import io

from ...models.gspn import DistillSettings, GSPNConfig, TrainingRecord, draw_loss_plot, load_gspn_weights
from ..category import CATEGORY
from .patch import apply_gspn, model_family, unet_layers
from .distillation import TrajectorySettings, output_path, run_distillation
from ..runtime import check_interrupt, progress_callback

GSPN_CATEGORY = f"{CATEGORY}/GSPN"
FOLDER = "gspn"

_KEEP_LEVELS_TIP = ("Keep softmax attention in this many of the lowest-resolution levels of the UNet (the middle "
                    "block is in the lowest): they are cheap and carry the global layout. 0 = GSPN everywhere.")
_KEEP_LAYERS_TIP = ("Comma-separated layers that keep softmax attention, e.g. 'middle.0.0, output.3.0' "
                    "(block, number, index as in ComfyUI's attn1 patches). Empty = none.")
_MIN_RES_TIP = ("Use GSPN only when the latent being sampled covers at least this many pixels squared "
                "(latent size x 8, as for SD1.5/SDXL; e.g. 1024 = 1 MP and up; with a tiled upscaler this is the "
                "tile). Smaller ones keep attention, where it is cheap. 0 = always GSPN.")


def _split_labels(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


class UltraResGSPNPatch(io.ComfyNode):
    """MODEL + GSPN weights -> MODEL whose UNet self-attention layers run GSPN."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UltraResGSPNPatch",
            display_name="GSPN Patch (SD1.5/SDXL)",
            category=GSPN_CATEGORY,
            description="Replaces the self-attention (attn1) of every UNet transformer block with GSPN line-scan "
                        "propagation from a weights file made by the GSPN Distill node for this model family. "
                        "Its cost grows linearly with the pixel count, so very large images get much faster.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.5 or SDXL model (the file must have been distilled for "
                                                "the same family)."),
                io.Combo.Input("gspn_weights", options=folder_paths.get_filename_list(FOLDER),
                               tooltip="GSPN weights from models/gspn, made by the GSPN Distill node."),
                io.Int.Input("keep_attention_levels", default=0, min=0, max=8, tooltip=_KEEP_LEVELS_TIP),
                io.String.Input("keep_attention_layers", default="", tooltip=_KEEP_LAYERS_TIP),
                io.Int.Input("min_resolution", default=0, min=0, max=65536, step=8, tooltip=_MIN_RES_TIP),
            ],
            outputs=[io.Model.Output(tooltip="The patched model (the input model is unchanged).")],
        )

    @classmethod
    def execute(cls, model, gspn_weights: str, keep_attention_levels: int, keep_attention_layers: str,
                min_resolution: int) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(FOLDER, gspn_weights)
        gspn, _ = load_gspn_weights(path, model_family(model), unet_layers(model))
        return io.NodeOutput(apply_gspn(model, gspn, keep_attention_levels, _split_labels(keep_attention_layers),
                                        min_resolution ** 2))


class UltraResGSPNDistill(io.ComfyNode):
    """Trains GSPN weights for a model from that model's own sampling trajectories."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UltraResGSPNDistill",
            display_name="GSPN Distill (make GSPN weights)",
            category=GSPN_CATEGORY,
            description="Trains one GSPN module per UNet self-attention layer to reproduce that layer's output "
                        "while the unpatched model samples your prompts (teacher = the model itself). Saves "
                        "models/gspn/<output_name>.safetensors every few steps, at the end, and when cancelled, "
                        "and can resume it. Outputs the patched model and the loss curve.",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5/SDXL model to distil (also the teacher)."),
                io.Conditioning.Input("positive", tooltip="Training prompts. Each entry is one prompt: join "
                                                          "several with Conditioning (Combine); trajectories "
                                                          "take them in turn."),
                io.String.Input("output_name", default="gspn_weights",
                                tooltip="File name in models/gspn (.safetensors is added)."),
                io.Int.Input("steps", default=1000, min=1, max=1_000_000,
                             tooltip="Optimiser steps in this run (one per sampling step of the teacher)."),
                io.Float.Input("learning_rate", default=1e-3, min=1e-6, max=1.0, step=1e-5,
                               tooltip="AdamW learning rate."),
                io.Int.Input("width", default=512, min=64, max=4096, step=8,
                             tooltip="Training image width: the model's native size works best (512 for SD1.5, "
                                     "1024 for SDXL)."),
                io.Int.Input("height", default=512, min=64, max=4096, step=8,
                             tooltip="Training image height (512 for SD1.5, 1024 for SDXL)."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images per trajectory."),
                io.Int.Input("sampling_steps", default=20, min=1, max=200,
                             tooltip="Steps of each teacher trajectory (normal scheduler, Euler)."),
                io.Float.Input("cfg", default=7.0, min=1.0, max=30.0, step=0.1,
                               tooltip="Guidance of the teacher trajectories (1 = no negative pass)."),
                io.Float.Input("prediction_weight", default=0.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Weight of final-prediction matching through the whole patched UNet "
                                       "(0 = layer outputs only; >0 is slower and needs memory for gradients)."),
                io.Int.Input("chunk", default=4, min=1, max=4096,
                             tooltip="Scan chunk length: how far each pixel sees per direction (4 in the "
                                     "paper's text-to-image models). Fixed for the file once created."),
                io.Int.Input("proxy_ratio", default=0, min=0, max=256,
                             tooltip="Proxy width = layer width / this. 0 = the paper's choice for the model: 8 "
                                     "for SD1.5, 32 for SDXL. Fixed for the file once created."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the teacher trajectories."),
                io.Boolean.Input("resume", default=False,
                                 tooltip="Continue training the existing file of this name (its chunk and proxy "
                                         "width are kept)."),
                io.Int.Input("save_every", default=100, min=0, max=1_000_000,
                             tooltip="Save every this many steps (0 = only at the end or when cancelled)."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Negative prompt of the teacher trajectories (default: empty)."),
            ],
            outputs=[io.Model.Output(tooltip="The model patched with the trained GSPN weights."),
                     io.Image.Output(tooltip="Loss curve (attn1 matching, and prediction matching if used).")],
        )

    @classmethod
    def execute(cls, model, positive, output_name: str, steps: int, learning_rate: float, width: int, height: int,
                batch_size: int, sampling_steps: int, cfg: float, prediction_weight: float, chunk: int,
                proxy_ratio: int, seed: int, resume: bool, save_every: int, negative=None) -> io.NodeOutput:
        path = output_path(folder_paths.get_folder_paths(FOLDER)[0], output_name)
        settings = DistillSettings(steps=steps, learning_rate=learning_rate, prediction_weight=prediction_weight,
                                   seed=seed, save_every=save_every)
        trajectory = TrajectorySettings(width=width, height=height, batch_size=batch_size,
                                        sampling_steps=sampling_steps, cfg=cfg)
        gspn, record = run_distillation(model, positive, negative, path, settings, trajectory,
                                        GSPNConfig(chunk=chunk, proxy_ratio=proxy_ratio), resume,
                                        on_progress=progress_callback(steps), check_interrupt=check_interrupt)
        return io.NodeOutput(apply_gspn(model, gspn), loss_image(record))


def loss_image(record: TrainingRecord) -> torch.Tensor:
    """The record's loss curve as a ComfyUI IMAGE ``[1, H, W, 3]`` in 0..1."""
    series = {"attn1 matching": record.layer_losses}
    if record.prediction_losses:
        series["prediction"] = record.prediction_losses
    plot = draw_loss_plot(series)
    return torch.from_numpy(plot.astype(np.float32) / 255.0)[None]


NODES: list[type[io.ComfyNode]] = [UltraResGSPNPatch, UltraResGSPNDistill]
