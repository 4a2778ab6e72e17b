"""The CLEAR nodes: their inputs, tooltips and what they do with them (the hooks are in :mod:`.hooks`,
the split over several devices in :mod:`.devices`)."""

from __future__ import annotations

import logging

import folder_paths
import torch
from comfy_api.latest import io

from ...models.clear import BACKENDS, resolve_pattern
from ..category import CATEGORY
from ..choices import check_choices, refuse_unlisted
from .devices import clear_attention_of, parse_devices, split_over_devices
from .hooks import apply_clear, flux_module, load_clear_file

NO_FILE = "none"

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
                               tooltip="The trained CLEAR file from models/clear (Hugging Face: Huage001/CLEAR). "
                                       "clear_local_8_down_4 is the authors' choice for 2K; _16 and _32 look "
                                       "further and are slower. 'none' uses the window without trained weights: "
                                       "the picture suffers, only for experiments."),
                io.Int.Input("window_radius", display_name="window radius (0 = the file's)", default=0, min=0,
                             max=1024,
                             tooltip="How far each part of the picture looks, in 16-px steps (8 = 128 px). Keep 0: "
                                     "the file's own radius, the only one its weights were trained for (needed with "
                                     "'none'). Technical: a token sees the tokens with dy² + dx² < r²."),
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


NODES: list[type[io.ComfyNode]] = [UltraResClearPatch, UltraResClearDevices]
