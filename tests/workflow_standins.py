"""Stand-ins for running the example workflows' API twins in a real ComfyUI on a CPU.

Real weights cannot be downloaded here and a CPU cannot run FLUX at 2K, so the integration
tests change exactly three things in each prompt and run everything else, every node of this
pack included, as shipped:

1. **Model files** keep their names and their architecture's layout (ComfyUI detects and
   builds the real model classes from them); the weights are random and the depth is cut
   where ComfyUI allows it:

   - ``flux1-dev.safetensors``: FLUX.1-dev's DiT with 1 double and 1 single block instead of
     19 + 38. ComfyUI fixes the width (3072), text width (4096) and heads for every FLUX file,
     so this is the smallest one UNETLoader loads (545 M parameters, stored in fp8: 0.55 GB).
   - ``ae.safetensors``: FLUX's 16-channel KL VAE at its real size (ComfyUI's VAE config is
     fixed; 84 M parameters).
   - ``sd_xl_base_1.0.safetensors``: a UNet that ComfyUI detects as SDXL (320 base channels,
     2048-wide context, 2816 ADM inputs, input transformer depths [0, 0, 2, 2, 10, 10]) with
     320 channels at every level and one transformer block per output and middle stage
     (SDXL's own: 640/1280 channels, up to 10 blocks), and the 4-channel KL VAE. It holds no
     text encoders (CLIP-G alone is 0.7 B parameters).
   - ``clear_local_8_down_4.safetensors``: the released layout for those 1 + 1 blocks.
   - ``mp_rank_00_model_states.pt``: the pack's built-in tiny Inf-DiT (its loader reads the sizes
     from the shapes) in the release's DeepSpeed/SAT layout.
   - GSPN weights are not made here: the distillation workflow writes them.

2. **Text encoding**: each ``CLIPTextEncode`` becomes ``StandInTextEncode`` (test node pack
   ``tests/workflows/standin_nodes``), which gives CONDITIONING of the real encoders' shapes;
   the CLIP loaders that fed only them are dropped. T5-XXL and CLIP-G have fixed sizes in
   ComfyUI (4.7 B and 0.7 B parameters), so no small file of their kind loads.

3. **Sizes and steps**: every ``width``/``height`` input and the input image are divided by
   :data:`SIZE_DIVISOR`, and every ``steps``/``sampling_steps`` input is capped at
   :data:`MAX_STEPS`. At 1/16 the CLEAR stage still has an 8 x 8 token grid, larger than the
   window of radius 8, so CLEAR's windowed attention runs, not a dense fallback.

Nothing here is imported by the pack; ComfyUI is imported inside the functions.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import save_file

import comfy_harness

SIZE_DIVISOR = 16
MAX_STEPS = 2
SIZE_INPUTS = ("width", "height")
STEP_INPUTS = ("steps", "sampling_steps")
TEXT_ENCODE, STANDIN_ENCODE = "CLIPTextEncode", "StandInTextEncode"
CLIP_LOADERS = ("DualCLIPLoader",)
# The only checkpoint the workflows load is SDXL; a DualCLIPLoader names its family itself.
CHECKPOINT_FAMILY = "sdxl"
STANDIN_PACK = Path(__file__).resolve().parent / "workflows" / "standin_nodes"

FLUX_CONFIG = dict(image_model="flux", in_channels=16, patch_size=2, out_channels=16, vec_in_dim=768,
                   context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=1,
                   depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000, qkv_bias=True, guidance_embed=True)
SDXL_CONFIG = dict(use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=320,
                   num_res_blocks=[2, 2, 2], channel_mult=[1, 1, 1], transformer_depth=[0, 0, 2, 2, 10, 10],
                   transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1], transformer_depth_middle=1,
                   context_dim=2048, num_head_channels=64, use_linear_in_transformer=True, adm_in_channels=2816,
                   num_classes="sequential", use_spatial_transformer=True, legacy=False,
                   use_temporal_resblock=False, use_temporal_attention=False)
# ComfyUI's KL VAE config (comfy/sd.py), latent channels apart.
KL_VAE_CONFIG = dict(double_z=True, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
                     num_res_blocks=2, attn_resolutions=[], dropout=0.0)


def random_tensors(shapes: dict[str, torch.Size], seed: int, dtype: torch.dtype,
                   std: float = 0.02) -> dict[str, torch.Tensor]:
    """Deterministic random weights of the given shapes; norm scales and weights near 1."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in sorted(shapes.items()):
        value = torch.randn(shape, generator=generator) * std
        if key.endswith(".scale") or (len(shape) == 1 and "norm" in key and key.endswith(".weight")):
            value += 1.0
        out[key] = value.to(dtype)
    return out


def _meta_shapes(module: torch.nn.Module) -> dict[str, torch.Size]:
    return {key: value.shape for key, value in module.state_dict().items()}


def write_flux_unet(path: Path, seed: int = 0) -> None:
    """FLUX.1-dev's DiT (full width, 1 + 1 blocks, guidance embedding) in fp8."""
    import comfy.model_detection

    config = comfy.model_detection.model_config_from_unet_config(comfy_harness.flux_unet_config(FLUX_CONFIG))
    with torch.device("meta"):
        shapes = _meta_shapes(config.get_model({}).diffusion_model)
    save_file(random_tensors(shapes, seed, torch.float8_e4m3fn), str(path))


def _kl_vae_shapes(latent_channels: int, with_quant_conv: bool) -> dict[str, torch.Size]:
    from comfy.ldm.models.autoencoder import AutoencoderKL, AutoencodingEngine

    ddconfig = {**KL_VAE_CONFIG, "z_channels": latent_channels}
    with torch.device("meta"):
        if with_quant_conv:
            vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=latent_channels)
        else:
            target = "comfy.ldm.modules.diffusionmodules.model."
            vae = AutoencodingEngine(
                regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
                encoder_config={"target": target + "Encoder", "params": ddconfig},
                decoder_config={"target": target + "Decoder", "params": ddconfig})
        return _meta_shapes(vae)


def write_flux_vae(path: Path, seed: int = 1) -> None:
    """FLUX's ``ae.safetensors`` layout: 16 latent channels, no quant convs."""
    save_file(random_tensors(_kl_vae_shapes(16, with_quant_conv=False), seed, torch.float16), str(path))


def write_sdxl_checkpoint(path: Path, seed: int = 2) -> None:
    """A checkpoint ComfyUI loads as SDXL (see the module docstring), with its VAE, without text encoders."""
    import comfy.model_detection
    import comfy.supported_models

    config = comfy.model_detection.model_config_from_unet_config(dict(SDXL_CONFIG))
    assert type(config) is comfy.supported_models.SDXL, type(config)
    with torch.device("meta"):
        unet = _meta_shapes(config.get_model({}).diffusion_model)
    state = {f"model.diffusion_model.{k}": v for k, v in random_tensors(unet, seed, torch.float16).items()}
    vae = random_tensors(_kl_vae_shapes(4, with_quant_conv=True), seed + 1, torch.float16)
    state.update({f"first_stage_model.{k}": v for k, v in vae.items()})
    save_file(state, str(path))


def write_clear_weights(path: Path, down_factor: int, seed: int = 3) -> None:
    """A released CLEAR file (diffusers names, every key the release has) for the stand-in FLUX's
    1 + 1 blocks: q/k/v/out projections and, with down-sampling, each layer's ``spatial_weight``
    at the reference's initial 1/d²."""
    from ultrares.models.clear.weights import SPATIAL_SUFFIX, released_keys

    hidden = FLUX_CONFIG["hidden_size"]
    keys = released_keys(FLUX_CONFIG["depth"], FLUX_CONFIG["depth_single_blocks"], down_sampled=down_factor > 1)
    shapes = {key: torch.Size([hidden, hidden] if key.endswith("weight") else [hidden])
              for key in keys if not key.endswith(SPATIAL_SUFFIX)}
    state = random_tensors(shapes, seed, torch.bfloat16)
    for key in keys:
        if key.endswith(SPATIAL_SUFFIX):
            state[key] = torch.full((1, 1, 1, down_factor, 1, down_factor, 1), 1 / down_factor ** 2)
    save_file(state, str(path))


def write_infdit_release(path: Path, seed: int = 4) -> None:
    """The pack's built-in tiny Inf-DiT (2 layers, 64 wide, 16-px blocks, 2-layer CLIP tower)
    saved the way the release is: a DeepSpeed pickle with SAT names, as ``mp_rank_00_model_states.pt``."""
    from infdit_release import released_state_dict, save_released_layout
    from ultrares.models.infdit.tiny import tiny_weights

    save_released_layout(released_state_dict(tiny_weights(seed=seed), seed=seed), path)


def standin_prompt(prompt: dict) -> dict:
    """The API prompt with the substitutions of the module docstring (a copy)."""
    out = copy.deepcopy(prompt)
    for node in out.values():
        inputs = node["inputs"]
        if node["class_type"] == TEXT_ENCODE:
            node["class_type"] = STANDIN_ENCODE
            node["inputs"] = {"text": inputs["text"], "family": _text_family(out[inputs["clip"][0]])}
            node["_meta"] = {"title": node["_meta"]["title"] + " (stand-in)"}
        for name in SIZE_INPUTS:
            if isinstance(inputs.get(name), int):
                inputs[name] //= SIZE_DIVISOR
        for name in STEP_INPUTS:
            if isinstance(inputs.get(name), int):
                inputs[name] = min(inputs[name], MAX_STEPS)
    loaders = {node_id for node_id, node in out.items() if node["class_type"] in CLIP_LOADERS}
    for node in out.values():
        for value in node["inputs"].values():
            assert not (isinstance(value, list) and value and value[0] in loaders), "a CLIP loader feeds another node"
    return {node_id: node for node_id, node in out.items() if node_id not in loaders}


def _text_family(clip_source: dict) -> str:
    if clip_source["class_type"] in CLIP_LOADERS:
        return clip_source["inputs"]["type"]
    assert clip_source["class_type"] == "CheckpointLoaderSimple", clip_source["class_type"]
    return CHECKPOINT_FAMILY
