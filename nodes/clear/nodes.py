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
from ...models.training import TOTAL, draw_loss_plot
from ..category import CATEGORY
from ..choices import check_choices, refuse_unlisted
from ..distill_report import report_stop
from ..runtime import NodeFeedback, check_interrupt
from ..training import TrajectorySettings, output_path
from .devices import clear_attention_of, parse_devices, split_over_devices
from .distillation import distill_report, loss_text, run_clear_distillation
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
            description="Makes CLEAR weights for your own FLUX model (FLUX.1-dev/schnell, a fine-tune, a merge, with "
                        "its LoRAs), for models the released files do not fit: the model draws your prompts as usual "
                        "and a copy of it that looks only at each part's neighbourhood learns to draw the same (the "
                        "model is its own teacher; no images are needed). Saves models/clear/<file name>.safetensors "
                        "in the released files' layout every few steps, at the end and if you cancel, and can "
                        "continue it later. Shows the loss as it goes (lower is better) and outputs the patched "
                        "model and the loss curve. Real models need thousands of steps and a large GPU. "
                        "Technical: the CLEAR paper's distillation (flow-matching, prediction and attention losses).",
            inputs=[
                io.Model.Input("model", tooltip="The FLUX model to make CLEAR weights for: the teacher, and the "
                                                "student's starting point (its LoRAs and other patches included)."),
                io.Conditioning.Input("positive", display_name="training prompts",
                                      tooltip="Prompts like the ones you will use: each entry is one prompt (join "
                                              "several with Conditioning (Combine)); the teacher draws them in "
                                              "turn. FLUX.1-dev wants its guidance set with FluxGuidance (3.5, as "
                                              "the paper's training)."),
                io.String.Input("output_name", display_name="file name (models/clear)",
                                default="clear_local_16_distilled",
                                tooltip="Name of the weights file in models/clear (.safetensors is added)."),
                io.Int.Input("window_radius", display_name="window radius", default=16, min=1, max=1024,
                             tooltip="How far each part of the picture will look, in 16-px steps (16 = 256 px): the "
                                     "released files use 8, 16 and 32; larger is slower and closer to the original. "
                                     "Fixed once the file exists. Technical: a token sees the tokens with "
                                     "dy² + dx² < r²."),
                io.Int.Input("down_factor", display_name="summary cells", default=1, min=1, max=64,
                             tooltip="Also give every part a coarse summary of the whole picture, in cells of this "
                                     "many tokens per side (the released _down_4 files use 4); 1 = no summary. "
                                     "Fixed once the file exists."),
                io.Int.Input("steps", display_name="training steps", default=1000, min=1, max=1_000_000,
                             tooltip="Training steps in this run; more steps, closer to the original model (the "
                                     "paper: 10K)."),
                io.Float.Input("learning_rate", display_name="learning rate", default=1e-4, min=1e-7, max=1.0,
                               step=1e-6,
                               tooltip="How big each training step is (AdamW; the reference's default 1e-4); lower "
                                       "it if the loss jumps around or the run stops with an error about the loss."),
                io.Int.Input("resolution", display_name="training size", default=1024, min=256, max=4096, step=16,
                             tooltip="Side of the square images the teacher draws (the paper: 1024)."),
                io.Int.Input("batch_size", display_name="images per step", default=1, min=1, max=256,
                             tooltip="Teacher images per training step, one after another (steadier, not more "
                                     "memory; the reference's is 32)."),
                io.Int.Input("teacher_samples", display_name="teacher images", default=1000, min=1, max=1_000_000,
                             tooltip="How many images the teacher draws (the paper: 10K); training goes through "
                                     "them in a new order each pass, at a random noise level each time. Kept in "
                                     "models/clear/<file name>.safetensors.samples/ for continuing."),
                io.Int.Input("sampling_steps", display_name="teacher steps per image", default=20, min=1, max=200,
                             tooltip="Drawing steps of each teacher image (Euler, simple scheduler)."),
                io.Float.Input("cfg", display_name="teacher CFG", default=1.0, min=1.0, max=30.0, step=0.1,
                               tooltip="CFG the teacher draws with: 1 for FLUX.1, whose guidance is in the prompt "
                                       "(FluxGuidance); above 1 also runs the negative prompt. Training itself uses "
                                       "the prompt alone, as the reference."),
                io.Float.Input("flow_matching_weight", display_name="weight: image matching", default=1.0, min=0.0,
                               max=10.0, step=0.05,
                               tooltip="How much the student learns to draw the teacher's finished images "
                                       "(technical: the flow-matching loss; reference: 1)."),
                io.Float.Input("prediction_weight", display_name="weight: step matching", default=0.5, min=0.0,
                               max=10.0, step=0.05,
                               tooltip="How much the student learns to match each of the teacher's steps "
                                       "(technical: its prediction; reference: 0.5)."),
                io.Float.Input("attention_weight", display_name="weight: attention matching", default=0.5, min=0.0,
                               max=10.0, step=0.05,
                               tooltip="How much the student's attention learns to match the teacher's, in every "
                                       "4th attention layer (technical: single blocks 1, 5, ..., 37; reference: "
                                       "0.5)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the teacher's images and of the training draws."),
                io.Boolean.Input("resume", display_name="continue the file", default=False,
                                 tooltip="Continue training the existing file of this name (same window and "
                                         "summary cells), with its optimizer state and teacher images; off refuses "
                                         "to overwrite it."),
                io.Int.Input("save_every", display_name="save every (steps)", default=100, min=0, max=1_000_000,
                             tooltip="Save every this many steps (0 = only at the end or if you cancel)."),
                io.Boolean.Input("optimizer_on_cpu", display_name="training state in RAM", default=False,
                                 tooltip="Keep the training state in system RAM (16 bytes per trained value: 27 GiB "
                                         "for FLUX.1) and only the weights being trained on the GPU: what lets a "
                                         "24 GB GPU distil FLUX.1 (with fp8 weights); each step is slower. "
                                         "Technical: AdamW's float32 values, gradients and moments on the CPU."),
                io.Conditioning.Input("negative", display_name="negative prompt", optional=True,
                                      tooltip="Negative prompt of the teacher's images when teacher CFG > 1 "
                                              "(default: empty)."),
            ],
            outputs=[io.Model.Output(tooltip="The model patched with the distilled file, as the CLEAR attention "
                                             "node would load it, to try it."),
                     io.Image.Output(display_name="loss curve",
                                     tooltip="Loss curves (image, step and attention matching), with the steps, the "
                                             "last losses and the saved file under them.")],
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
        feedback = NodeFeedback("CLEAR Distill", log)
        saving = f"every {save_every} steps, " if save_every else ""
        feedback.announce(f"training CLEAR weights (window radius {window_radius}, summary cells {down_factor}), "
                          f"{steps} steps ({'continuing ' if resume and path.exists() else ''}{path.name} in "
                          f"{path.parent})\nthe first steps also draw the teacher's images · saved {saving}at the end "
                          "and if you cancel · lower loss is better")
        report = distill_report(path, steps, lambda text: log.info("CLEAR Distill: %s", text), feedback.status)
        try:
            _, record = run_clear_distillation(model, positive, negative, path, pattern, settings, trajectory, resume,
                                               on_progress=feedback.progress, check_interrupt=check_interrupt,
                                               report=report)
        except BaseException as error:
            report_stop(error, report, feedback)
            raise
        feedback.finish(f"finished in {feedback.elapsed()}: {loss_text(record)} · saved in {path}", logged=False)
        weights, _ = load_clear_file(model, path.name)
        return io.NodeOutput(apply_clear(model, pattern, weights), loss_image(record, path))


def loss_image(record: ClearTrainingRecord, path=None) -> torch.Tensor:
    """The record's loss curves as a ComfyUI IMAGE ``[1, H, W, 3]`` in 0..1, with where the weights
    were saved and the last losses written under them."""
    series = {name: record.losses[name] for name in (FLOW_MATCHING, PREDICTION, ATTENTION) if name in record.losses}
    notes = [f"{record.steps} steps, {loss_text(record)}" if record.losses.get(TOTAL) else "no steps yet"]
    if path is not None:
        notes.append(f"saved to {path}")
    plot = draw_loss_plot(series, notes=notes)
    return torch.from_numpy(plot.astype(np.float32) / 255.0)[None]


NODES: list[type[io.ComfyNode]] = [UltraResClearPatch, UltraResClearDevices, UltraResClearDistill]
