"""The CLEAR nodes: their inputs, tooltips and what they do with them (the hooks are in :mod:`.hooks`,
the split over several devices in :mod:`.devices`)."""

from __future__ import annotations

import logging

import folder_paths
import torch
from comfy_api.latest import io

from ...models.clear import BACKENDS, resolve_pattern
from ..category import CATEGORY
from .devices import clear_attention_of, parse_devices, split_over_devices
from .hooks import apply_clear, flux_module, load_clear_file

NO_FILE = "none"

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
                               tooltip="A released CLEAR file (clear_local_<r>[_down_<d>].safetensors) from "
                                       "models/clear. 'none' applies the window without the fine-tuned weights: "
                                       "the model was not trained for it and quality drops; use the weights."),
                io.Int.Input("window_radius", default=0, min=0, max=1024,
                             tooltip="Radius r in image tokens (16 px each): a token sees the tokens with "
                                     "dy^2 + dx^2 < r^2. 0 = the file's radius (needed with 'none')."),
                io.Int.Input("down_factor", default=0, min=0, max=64,
                             tooltip="Size d of the d x d cells of the down-sampled keys; 1 = none. "
                                     "0 = the file's factor (1 with 'none')."),
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


NODES: list[type[io.ComfyNode]] = [UltraResClearPatch, UltraResClearDevices]
