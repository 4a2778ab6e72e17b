"""ComfyUI nodes for the Inf-DiT upsampler: a loader and the block-scheduled upscale node.

Thin glue over the Inf-DiT package's public API (:mod:`..models.infdit`): loading, planning
and sampling happen there; here only ComfyUI's folders, device management, free memory,
log, progress bar and cancel button are wired in.

On several devices the upscale runs in worker processes, one per device, that load the
weights from the loader's file themselves and plan with the memory free on their GPUs
(:func:`..models.infdit.upscale_on_ranks`); ComfyUI's own copy stays where model management
keeps it. Before they start, model management frees what a rank needs on the GPUs where
ComfyUI keeps models (unloading other models, and this one, as it would for any model); the
plan's messages reach ComfyUI's log, the progress bar counts the batches of all ranks, Cancel
stops every rank, and the call returns once no worker is left, so their GPU memory is free
again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import comfy.model_management as mm
import comfy.model_patcher
import folder_paths
import torch
from comfy_api.latest import io

from ...models.infdit import (DTYPES, SCAN_ORDERS, GiB, BudgetTooSmall, InfDiTWeights, RankFailed, UpscaleOptions,
                              WeightSource, allocator_headroom, load_infdit, parse_devices, plan_budget, upscale,
                              upscale_on_ranks, weight_bytes, working_memory)
from ..category import CATEGORY
from ..patchers import free_device_memory, new_patcher
from ..runtime import check_interrupt, progress_callback

INFDIT_CATEGORY = f"{CATEGORY}/Inf-DiT"
InfDiTModel = io.Custom("INFDIT_MODEL")
FROM_CHECKPOINT = "from checkpoint"
CLIP_VISION_PREFIX = "clip_vision/"
AUTO_DEVICES = "auto"


class _Modules(torch.nn.Module):
    """The DiT and its CLIP tower as one module, so ComfyUI moves and frees them together."""

    def __init__(self, weights: InfDiTWeights):
        super().__init__()
        self.net = weights.net
        self.clip = weights.clip


@dataclass
class LoadedInfDiT:
    """What flows along an INFDIT_MODEL wire."""

    weights: InfDiTWeights
    patcher: comfy.model_patcher.ModelPatcher
    name: str
    source: WeightSource
    """Where worker processes load the same weights from (several devices)."""


def _clip_options() -> list[str]:
    return ([FROM_CHECKPOINT] + folder_paths.get_filename_list("infdit")
            + [CLIP_VISION_PREFIX + name for name in folder_paths.get_filename_list("clip_vision")])


def weight_dtype(choice: str, device: torch.device) -> str:
    """The loader's ``dtype`` choice on ``device``, a key of ``DTYPES``: ``auto`` is bf16 where
    supported (as trained), else fp16 on GPUs that have it, else fp32."""
    if choice != "auto":
        return choice
    if mm.should_use_bf16(device):
        return "bf16"
    return "fp16" if mm.should_use_fp16(device) else "fp32"


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def rank_devices(spec: str, load_device: torch.device) -> list[torch.device] | None:
    """The devices of the ``devices`` input, or ``None`` for ComfyUI's own device (today's
    in-process path): ``auto`` is every visible GPU when ComfyUI runs on a GPU and sees more
    than one, otherwise ComfyUI's device; a list naming only ComfyUI's device is that device."""
    spec = spec.strip()
    if spec in ("", AUTO_DEVICES):
        count = torch.cuda.device_count() if load_device.type == "cuda" else 0
        return [torch.device("cuda", index) for index in range(count)] if count > 1 else None
    devices = parse_devices(spec)
    return None if len(devices) == 1 and _same_device(devices[0], load_device) else devices


class UltraResInfDiTLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UltraResInfDiTLoader",
            display_name="Load Inf-DiT upsampler",
            category=INFDIT_CATEGORY,
            description=("Loads an Inf-DiT upsampler from models/infdit: the released mp_rank_00_model_states.pt "
                         "or a file converted with cli/infdit_convert.py. Sizes are read from "
                         "the weights; a file with missing or unexpected keys is refused with their names."),
            inputs=[
                io.Combo.Input("checkpoint", options=folder_paths.get_filename_list("infdit"),
                               tooltip="Inf-DiT weights in models/infdit (released .pt or converted .safetensors)."),
                io.Combo.Input("clip_vision", options=_clip_options(), default=FROM_CHECKPOINT,
                               tooltip=("OpenCLIP ViT-L/14 DataComp-XL image tower (open_clip_pytorch_model.bin) that "
                                        "describes the input: taken from the checkpoint when it has one, or from "
                                        "this file (models/infdit or models/clip_vision).")),
                io.Combo.Input("dtype", options=["auto", *DTYPES], default="auto",
                               tooltip="Weight and compute precision. auto: bf16 where supported (as trained), "
                                       "else fp16 on GPUs, fp32 on the CPU."),
            ],
            outputs=[InfDiTModel.Output(display_name="infdit_model")],
        )

    @classmethod
    def execute(cls, checkpoint: str, clip_vision: str, dtype: str) -> io.NodeOutput:
        device = mm.get_torch_device()
        path = folder_paths.get_full_path_or_raise("infdit", checkpoint)
        if clip_vision == FROM_CHECKPOINT:
            clip_path = None
        elif clip_vision.startswith(CLIP_VISION_PREFIX):
            clip_path = folder_paths.get_full_path_or_raise("clip_vision", clip_vision[len(CLIP_VISION_PREFIX):])
        else:
            clip_path = folder_paths.get_full_path_or_raise("infdit", clip_vision)
        source = WeightSource(path=path, clip_path=clip_path, dtype=weight_dtype(dtype, device))
        weights = load_infdit(path, DTYPES[source.dtype], clip_path)
        if weights.clip is None:
            raise ValueError(f"{checkpoint} has no CLIP image tower: choose the OpenCLIP ViT-L/14 DataComp-XL file "
                             "(open_clip_pytorch_model.bin) as clip_vision")
        patcher = new_patcher(_Modules(weights), device, mm.unet_offload_device())
        return io.NodeOutput(LoadedInfDiT(weights, patcher, checkpoint, source))


class UltraResInfDiTUpscale(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UltraResInfDiTUpscale",
            display_name="Inf-DiT upscale (VRAM budget)",
            category=INFDIT_CATEGORY,
            description=("Upscales images 2x/4x (8x and 16x by repeating) with Inf-DiT. The image is generated a few "
                         "128-px blocks at a time; the batch size is the largest that fits the VRAM budget, and the "
                         "result equals generating the whole image at once. Any size works: the input is padded to "
                         "whole blocks and the result cropped; an alpha channel is resized."),
            inputs=[
                InfDiTModel.Input("infdit_model", tooltip="From 'Load Inf-DiT upsampler'."),
                io.Image.Input("image", tooltip="Images to upscale (a batch is processed one image at a time)."),
                io.Combo.Input("scale", options=["2", "4", "8", "16"], default="4",
                               tooltip="Upscale factor. The model does 2x and 4x; 8x = 4x then 2x, 16x = 4x twice."),
                io.Int.Input("steps", default=20, min=1, max=200,
                             tooltip="Heun steps (20 as released: 39 network evaluations)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the initial noise (drawn for the whole image, so results do not "
                                     "depend on the batch size)."),
                io.Boolean.Input("init_noise", default=True,
                                 tooltip="Start from the upsampled input plus noise (as released; avoids colour "
                                         "shifts) instead of pure noise."),
                io.Float.Input("vram_budget_gb", default=0.0, min=0.0, max=1024.0, step=0.5,
                               tooltip="Device memory (GiB) the upscale may use, weights included; picks how many "
                                       "blocks are generated at once. 0: what is free once the model is loaded "
                                       "(other models are unloaded only if one block would not fit). A budget "
                                       "above what is free is lowered to it."),
                io.Combo.Input("scan", options=list(SCAN_ORDERS), default="auto",
                               tooltip="Order of block batches. auto scans along the shorter side, which keeps "
                                       "the smallest cache of neighbour keys."),
                io.Boolean.Input("offload_cache", default=False,
                                 tooltip="Keep the cached neighbour keys and the full-image buffers in CPU RAM: "
                                         "VRAM then stays flat however large the image (slower, needs RAM). When "
                                         "off, it is still switched on if the budget is too small without it "
                                         "(same result)."),
                io.String.Input("devices", default=AUTO_DEVICES, optional=True,
                                tooltip="Which GPUs share the work. auto: all GPUs this ComfyUI can see (one GPU: "
                                        "just that one, as usual). Or a list such as cuda:0,cuda:1. With several, "
                                        "each GPU loads its own copy of the model and works on its own band of the "
                                        "image, and the VRAM budget applies to each GPU; the result is the same as "
                                        "on one GPU."),
            ],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, infdit_model: LoadedInfDiT, image: torch.Tensor, scale: str, steps: int, seed: int,
                init_noise: bool, vram_budget_gb: float, scan: str, offload_cache: bool,
                devices: str = AUTO_DEVICES) -> io.NodeOutput:
        weights, patcher = infdit_model.weights, infdit_model.patcher
        targets = rank_devices(devices, patcher.load_device)
        device = patcher.load_device if targets is None else targets[0]
        size = tuple(image.shape[1:3])
        requested = vram_budget_gb * GiB if vram_budget_gb > 0 else None
        options = UpscaleOptions(scale=int(scale), steps=steps, seed=seed, init_noise=init_noise, scan=scan,
                                 offload=offload_cache, margin=allocator_headroom(device), budget_bytes=requested)
        try:
            if targets is None:
                out = cls._on_comfyuis_device(weights, patcher, image, size, options)
            else:
                out = cls._on_several_devices(infdit_model, image, size, options, targets)
        except BudgetTooSmall as error:
            raise ValueError(f"Inf-DiT: {error}") from error
        except RankFailed as error:
            raise RuntimeError(f"Inf-DiT on {', '.join(map(str, targets))}: {error}") from error
        return io.NodeOutput(out.movedim(1, -1).to(mm.intermediate_device()))

    @staticmethod
    def _on_comfyuis_device(weights: InfDiTWeights, patcher, image: torch.Tensor, size: tuple[int, int],
                            options: UpscaleOptions) -> torch.Tensor:
        device = patcher.load_device
        # Ask ComfyUI for the memory the plan needs, unloading other models if it must;
        # then plan with what is really free.
        mm.load_models_gpu([patcher], memory_required=working_memory(weights, size, options), force_full_load=True)
        free, host_free = free_device_memory(patcher, device), mm.get_free_memory(torch.device("cpu"))
        plan = plan_budget(weights, size, options, free, host_free)
        for level, message in plan.messages:
            logging.log(level, "Inf-DiT: %s", message)
        return upscale(weights, image.movedim(-1, 1), plan.options, device, _LazyProgress(), check_interrupt)

    @staticmethod
    def _on_several_devices(model: LoadedInfDiT, image: torch.Tensor, size: tuple[int, int], options: UpscaleOptions,
                            targets: list[torch.device]) -> torch.Tensor:
        weights, ranks = model.weights, len(targets)
        # Each rank loads its own copy of the weights and plans with what its GPU has free:
        # make room through model management on the GPUs where ComfyUI keeps models (asking
        # about the others here would put a CUDA context on each of them in this process).
        need = weight_bytes(weights) + working_memory(weights, size, options, ranks)
        for device in _devices_with_comfyui_models(targets):
            mm.free_memory(need, device)
        logging.info("Inf-DiT: %d ranks on %s", ranks, ", ".join(map(str, targets)))
        try:
            return upscale_on_ranks(model.source, image.movedim(-1, 1), options, targets, on_progress=_LazyProgress(),
                                    check_interrupt=check_interrupt)
        finally:
            mm.soft_empty_cache()


def _devices_with_comfyui_models(targets: list[torch.device]) -> list[torch.device]:
    """The GPUs among ``targets`` that ComfyUI computes on or keeps loaded models on."""
    used = [mm.get_torch_device()] + [loaded.device for loaded in getattr(mm, "current_loaded_models", [])
                                      if getattr(loaded, "device", None) is not None]
    return [device for device in targets
            if device.type == "cuda" and any(_same_device(device, torch.device(other)) for other in used)]


class _LazyProgress:
    """ComfyUI's progress bar, created on the first report (when the total is known)."""

    def __init__(self) -> None:
        self._report = None

    def __call__(self, done: int, total: int) -> None:
        if self._report is None:
            self._report = progress_callback(total)
        self._report(done, total)


NODES: list[type[io.ComfyNode]] = [UltraResInfDiTLoader, UltraResInfDiTUpscale]
