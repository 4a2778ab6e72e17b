"""Putting GSPN modules into a ComfyUI SD1.5/SDXL model: one ``attn1`` replace per UNet
self-attention layer, the modules under ComfyUI's memory management.

ComfyUI computes the layer's ``to_q/to_k/to_v``, calls the replace with q, k, v and applies
``to_out`` to its result; the token grid comes from ``extra_options["activations_shape"]``.
Layers kept as attention, and every layer while the image is below ``min_pixels``, run the
replace that was there before (another pack's) or ComfyUI's own attention.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_patcher
import torch

from ...models.gspn import GSPNAttention, GSPNLayers, LayerSpec, find_attn1_layers
from ..patchers import new_patcher

ADDITIONAL_MODELS_KEY = "ultrares_gspn"
LATENT_SCALE = 8  # SD1.5/SDXL latents are 1/8 of the image size

Attn1 = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict], torch.Tensor]


def layer_label(spec: LayerSpec) -> str:
    """Short name of a layer for users: ``input.1.0``, ``middle.0.0``, ``output.5.2``."""
    return ".".join(str(part) for part in spec.block)


def model_family(model: comfy.model_patcher.ModelPatcher) -> str:
    """ComfyUI's model class name (``SD15``, ``SDXL``, ...): what a weight file is made for."""
    return type(model.model.model_config).__name__


def unet_layers(model: comfy.model_patcher.ModelPatcher) -> list[LayerSpec]:
    """The UNet self-attention layers of ``model``; a clear error for anything else (e.g. FLUX)."""
    try:
        return find_attn1_layers(model.get_model_object("diffusion_model"))
    except ValueError as error:
        raise ValueError(f"GSPN needs an SD1.5/SDXL-style UNet, but this {model_family(model)} model has "
                         f"none: {error}") from None


def kept_layers(specs: list[LayerSpec], keep_levels: int, keep_labels: Iterable[str]) -> set[str]:
    """Names of the layers that stay attention: the ``keep_levels`` lowest-resolution levels and
    the layers named in ``keep_labels``."""
    labels = {layer_label(s): s.name for s in specs}
    unknown = sorted(set(keep_labels) - set(labels))
    if unknown:
        raise ValueError(f"unknown layer(s) {unknown} to keep as attention; this model's layers are "
                         f"{', '.join(labels)}")
    levels = sorted({s.level for s in specs}, reverse=True)[:max(keep_levels, 0)]
    return {s.name for s in specs if s.level in levels} | {labels[label] for label in keep_labels}


def comfy_attention_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
    """What ComfyUI's own self-attention computes from q, k, v: its current attention backend, or
    the ``optimized_attention_override`` another pack set in the transformer options."""
    return comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"],
                                               attn_precision=extra_options.get("attn_precision"),
                                               transformer_options=extra_options)


def gspn_call(module: GSPNAttention) -> Attn1:
    """An ``attn1`` replace that runs ``module`` on the layer's q, k, v in the module's dtype."""
    def attn1(q, k, v, extra_options):
        height, width = extra_options["activations_shape"][-2:]
        dtype = module.to_proxy.weight.dtype
        return module(q.to(dtype), k.to(dtype), v.to(dtype), height, width).to(q.dtype)
    return attn1


def _gated(gspn: Attn1, fallback: Attn1, min_pixels: int) -> Attn1:
    def attn1(q, k, v, extra_options):
        shape = extra_options.get("original_shape")
        if shape is not None and shape[-2] * shape[-1] * LATENT_SCALE ** 2 < min_pixels:
            return fallback(q, k, v, extra_options)
        return gspn(q, k, v, extra_options)
    return attn1


def model_compute_dtype(model: comfy.model_patcher.ModelPatcher) -> torch.dtype:
    """The dtype ``model`` computes in (its manual-cast dtype where it has one): the GSPN modules run in it."""
    dtype = getattr(model.model, "manual_cast_dtype", None) or model.model_dtype()
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def apply_gspn(model: comfy.model_patcher.ModelPatcher, gspn: GSPNLayers, keep_levels: int = 0,
               keep_labels: Iterable[str] = (), min_pixels: int = 0) -> comfy.model_patcher.ModelPatcher:
    """A clone of ``model`` whose self-attention layers run ``gspn`` (the caller's model is untouched)."""
    patched = model.clone()
    keep = kept_layers(gspn.specs, keep_levels, keep_labels)
    gspn.to(dtype=model_compute_dtype(model)).eval().requires_grad_(False)
    patched.set_additional_models(ADDITIONAL_MODELS_KEY, [new_patcher(gspn, model.load_device, model.offload_device)])
    before = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    for spec, module in gspn.items():
        if spec.name in keep:
            continue
        fallback = before.get(spec.block) or before.get(spec.block[:2]) or comfy_attention_call
        call = gspn_call(module)
        patched.set_model_attn1_replace(_gated(call, fallback, min_pixels) if min_pixels else call, *spec.block)
    return patched
