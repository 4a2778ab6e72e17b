"""GSPN nodes: patch a SD1.5/SDXL model with GSPN weights, and distil those weights from the
model itself (no text-to-image GSPN weights are public)."""

from __future__ import annotations

import logging

import folder_paths
import numpy as np
import torch
from comfy_api.latest import io

from ...models.gspn import DistillSettings, GSPNConfig, TrainingRecord, draw_loss_plot, load_gspn_weights
from ..category import CATEGORY
from ..choices import refuse_unlisted
from ..distill_report import report_stop
from ..runtime import NodeFeedback, check_interrupt
from .distillation import TrajectorySettings, distill_report, loss_text, output_path, run_distillation
from .patch import apply_gspn, model_family, unet_layers

log = logging.getLogger(__name__)

GSPN_CATEGORY = f"{CATEGORY}/GSPN"
FOLDER = "gspn"

_KEEP_LEVELS_TIP = ("Keep the original attention in this many of the UNet's coarsest levels (the middle of the UNet is "
                    "the coarsest): they are cheap and shape the overall layout, so keeping them can help the "
                    "composition. 0 = GSPN everywhere.")
_KEEP_LAYERS_TIP = ("Layers that keep the original attention, by name, comma-separated, e.g. 'middle.0.0, output.3.0' "
                    "(block, number, index as in ComfyUI's attn1 patches); empty = none. For fine-tuning what GSPN "
                    "replaces.")
_MIN_RES_TIP = ("Use GSPN only when the image (or a tiled upscaler's tile) is at least this many pixels on a side, "
                "counted as width × height: 1024 = 1 megapixel and up. Smaller ones keep the original attention, "
                "which is cheap there. 0 = always GSPN.")
MISSING_WEIGHTS = ("GSPN weights are made, not downloaded: make this file with the GSPN Distill node (the template "
                   "'Train GSPN weights for your SDXL model' does it for SDXL), then press R to refresh the lists")


def _split_labels(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


class UltraResGSPNPatch(io.ComfyNode):
    """MODEL + GSPN weights -> MODEL whose UNet self-attention layers run GSPN."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UltraResGSPNPatch",
            display_name="GSPN Patch (fast SD1.5/SDXL at large sizes)",
            category=GSPN_CATEGORY,
            description="Makes SD1.5 and SDXL much faster at large sizes: the UNet's self-attention, whose work grows "
                        "with the square of the pixel count, is replaced by GSPN, a line-by-line propagation whose "
                        "work grows in step with it. Needs GSPN weights made for your model's family by the GSPN "
                        "Distill node (none are published). Technical: GSPN (arXiv 2501.12381) in every attn1 of the "
                        "UNet's transformer blocks.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.5 or SDXL model (the GSPN file must have been made for the "
                                                "same family)."),
                io.Combo.Input("gspn_weights", display_name="GSPN weights", options=folder_paths.get_filename_list(FOLDER),
                               tooltip="A file from models/gspn made by the GSPN Distill node for this model family."),
                io.Int.Input("keep_attention_levels", display_name="keep attention in coarsest levels", default=0,
                             min=0, max=8, tooltip=_KEEP_LEVELS_TIP),
                io.String.Input("keep_attention_layers", display_name="keep attention in layers", default="",
                                tooltip=_KEEP_LAYERS_TIP),
                io.Int.Input("min_resolution", display_name="use GSPN from (px per side)", default=0, min=0,
                             max=65536, step=8, tooltip=_MIN_RES_TIP),
            ],
            outputs=[io.Model.Output(tooltip="The patched model (the input model is unchanged).")],
        )

    @classmethod
    def validate_inputs(cls, gspn_weights: str | None = None) -> bool | str:
        return refuse_unlisted(cls, {"gspn_weights": gspn_weights}, {"gspn_weights": MISSING_WEIGHTS})

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
            description="Makes the GSPN weights for your own SD1.5/SDXL checkpoint: while the model draws your "
                        "prompts as usual, GSPN learns to do what each of its attention layers does (the model is its "
                        "own teacher; no images are needed). Saves models/gspn/<file name>.safetensors every few "
                        "steps, at the end and if you cancel, and can continue it later. Shows the loss as it goes "
                        "(1 = no better than nothing, lower is better) and outputs the patched model and the loss "
                        "curve. Real checkpoints need thousands of steps.",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5/SDXL model to make GSPN weights for (also the teacher)."),
                io.Conditioning.Input("positive", display_name="training prompts",
                                      tooltip="Prompts like the ones you will use: each entry is one prompt (join "
                                              "several with Conditioning (Combine)); they are drawn in turn."),
                io.String.Input("output_name", display_name="file name (models/gspn)", default="gspn_weights",
                                tooltip="Name of the weights file in models/gspn (.safetensors is added)."),
                io.Int.Input("steps", display_name="training steps", default=1000, min=1, max=1_000_000,
                             tooltip="Training steps in this run (one per drawing step of the teacher); more steps, "
                                     "closer to the original attention. Thousands for a real checkpoint."),
                io.Float.Input("learning_rate", display_name="learning rate", default=1e-3, min=1e-6, max=1.0,
                               step=1e-5,
                               tooltip="How big each training step is (AdamW); lower it if the loss jumps around or "
                                       "the run stops with an error about the loss."),
                io.Int.Input("width", display_name="training width", default=512, min=64, max=4096, step=8,
                             tooltip="Width of the images drawn for training: the model's native size works best "
                                     "(512 for SD1.5, 1024 for SDXL)."),
                io.Int.Input("height", display_name="training height", default=512, min=64, max=4096, step=8,
                             tooltip="Height of the images drawn for training (512 for SD1.5, 1024 for SDXL)."),
                io.Int.Input("batch_size", display_name="images at once", default=1, min=1, max=64,
                             tooltip="Images drawn together per training step (more: steadier, needs more memory)."),
                io.Int.Input("sampling_steps", display_name="teacher steps per image", default=20, min=1, max=200,
                             tooltip="Drawing steps of each training image (normal scheduler, Euler)."),
                io.Float.Input("cfg", display_name="teacher CFG", default=7.0, min=1.0, max=30.0, step=0.1,
                               tooltip="Guidance the teacher draws with (1 = no negative prompt pass, faster)."),
                io.Float.Input("prediction_weight", display_name="whole-model matching", default=0.0, min=0.0,
                               max=10.0, step=0.05,
                               tooltip="Also train on the whole patched model's result, with this weight (0 = each "
                                       "layer on its own, the fast default; above 0 is slower and needs memory for "
                                       "gradients through the UNet)."),
                io.Int.Input("chunk", display_name="scan reach (chunk)", default=4, min=1, max=4096,
                             tooltip="How far each pixel's information travels along a line in one pass (4 in the "
                                     "paper's text-to-image models); larger is slower. Fixed once the file exists."),
                io.Int.Input("proxy_ratio", display_name="slimming (proxy ratio, 0 = paper's)", default=0, min=0,
                             max=256,
                             tooltip="How much GSPN slims each layer's channels inside (layer width / this): larger "
                                     "is smaller and faster, smaller follows the attention more closely. 0 = the "
                                     "paper's choice: 8 for SD1.5, 32 for SDXL. Fixed once the file exists."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the training images."),
                io.Boolean.Input("resume", display_name="continue the file", default=False,
                                 tooltip="Continue training the existing file of this name (its scan reach and "
                                         "slimming are kept); off refuses to overwrite it."),
                io.Int.Input("save_every", display_name="save every (steps)", default=100, min=0, max=1_000_000,
                             tooltip="Save every this many steps (0 = only at the end or if you cancel)."),
                io.Conditioning.Input("negative", display_name="negative prompt", optional=True,
                                      tooltip="Negative prompt of the training images (default: empty)."),
            ],
            outputs=[io.Model.Output(tooltip="The model patched with the trained GSPN weights, to try them."),
                     io.Image.Output(display_name="loss curve",
                                     tooltip="Loss curve (each layer's matching, and whole-model matching if used), "
                                             "with the steps, the last losses and the saved file under it.")],
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
        feedback = NodeFeedback("GSPN Distill", log)
        saving = f"every {save_every} steps, " if save_every else ""
        feedback.announce(f"training GSPN weights for this {model_family(model)} model, {steps} steps "
                          f"({'continuing ' if resume and path.exists() else ''}{path.name} in {path.parent})\n"
                          f"saved {saving}at the end and if you cancel · loss: 1 = no better than nothing, lower "
                          "is better")
        report = distill_report(path, steps, lambda text: log.info("GSPN Distill: %s", text), feedback.status)
        try:
            gspn, record = run_distillation(model, positive, negative, path, settings, trajectory,
                                            GSPNConfig(chunk=chunk, proxy_ratio=proxy_ratio), resume,
                                            on_progress=feedback.progress, check_interrupt=check_interrupt,
                                            report=report)
        except BaseException as error:
            report_stop(error, report, feedback)
            raise
        feedback.finish(f"finished in {feedback.elapsed()}: {loss_text(record)} · saved in {path}", logged=False)
        return io.NodeOutput(apply_gspn(model, gspn), loss_image(record, path))


def loss_image(record: TrainingRecord, path=None) -> torch.Tensor:
    """The record's loss curve as a ComfyUI IMAGE ``[1, H, W, 3]`` in 0..1, with where the weights
    were saved and the last losses written under it."""
    series = {"attn1 matching": record.layer_losses}
    if record.prediction_losses:
        series["prediction"] = record.prediction_losses
    notes = [f"{record.steps} steps, {loss_text(record)}" if record.layer_losses else "no steps yet"]
    if path is not None:
        notes.append(f"saved to {path}")
    plot = draw_loss_plot(series, notes=notes)
    return torch.from_numpy(plot.astype(np.float32) / 255.0)[None]


NODES: list[type[io.ComfyNode]] = [UltraResGSPNPatch, UltraResGSPNDistill]
