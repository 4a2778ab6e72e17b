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

While it runs the node shows (:class:`..runtime.NodeFeedback`): the plan in a few lines (output
size, batch size and the work it makes, the memory and why), where the upscale is ("evaluation
12/39 · batch 3/16", per device with several) with the time left, and a preview of the image
being built on its progress bar (painted by the ranks and put together here with several).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import comfy.model_management as mm
import comfy.model_patcher
import folder_paths
import torch
from comfy_api.latest import io

from ...models.infdit import (DTYPES, SCAN_ORDERS, GiB, BudgetTooSmall, InfDiTWeights, PreviewCanvas, RankFailed,
                              UpscaleOptions, UpscaleStep, WeightSource, allocator_headroom, holds_clip_tower,
                              load_infdit, not_a_clip_tower, parse_devices, plan_budget, upscale, upscale_on_ranks,
                              weight_bytes, working_memory)
from ..category import CATEGORY
from ..choices import check_choices, refuse_unlisted
from ..patchers import free_device_memory, new_patcher
from ..runtime import NodeFeedback, check_interrupt

INFDIT_CATEGORY = f"{CATEGORY}/Inf-DiT"
InfDiTModel = io.Custom("INFDIT_MODEL")
FROM_CHECKPOINT = "from checkpoint"
CLIP_VISION_PREFIX = "clip_vision/"
AUTO_DEVICES = "auto"

log = logging.getLogger(__name__)


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


def _towers(folder: str) -> list[str]:
    """The files of a model folder that can be the CLIP tower (by their tensor names, nothing loaded)."""
    return [name for name in folder_paths.get_filename_list(folder)
            if (path := folder_paths.get_full_path(folder, name)) is not None and holds_clip_tower(path)]


def clip_hint(choice: object) -> str:
    """What to do about a ``clip_vision`` value that is not offered: what the file is, if it is there."""
    choice = str(choice)
    folder, name = (("clip_vision", choice[len(CLIP_VISION_PREFIX):]) if choice.startswith(CLIP_VISION_PREFIX)
                    else ("infdit", choice))
    path = folder_paths.get_full_path(folder, name)
    reason = not_a_clip_tower(path) if path is not None else None
    return reason or ("choose 'from checkpoint', or put the OpenCLIP ViT-L/14 file (open_clip_pytorch_model.bin) "
                      "into models/infdit")


def clip_options() -> list[str]:
    """The loader's CLIP tower choices: the checkpoint's own, then the OpenCLIP towers in models/infdit
    and models/clip_vision (not the Inf-DiT checkpoints, nor ComfyUI's Hugging Face-layout CLIP vision models)."""
    return [FROM_CHECKPOINT] + _towers("infdit") + [CLIP_VISION_PREFIX + name for name in _towers("clip_vision")]


def weight_dtype(choice: str, device: torch.device) -> str:
    """The loader's ``dtype`` choice on ``device``, a key of ``DTYPES``: ``auto`` is bf16 where
    supported (as trained), else fp16 on GPUs that have it, else fp32."""
    if choice != "auto":
        return choice
    if mm.should_use_bf16(device):
        return "bf16"
    return "fp16" if mm.should_use_fp16(device) else "fp32"


def memory_name(device: torch.device) -> str:
    """What the memory a plan is for is called, for the user: ``"GPU memory"``, or ``"CPU RAM"``."""
    return {"cuda": "GPU memory", "cpu": "CPU RAM"}.get(device.type, f"{device.type} memory")


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
            description=("Loads the Inf-DiT upscaler (the model behind 'Inf-DiT upscale') from models/infdit: the "
                         "released mp_rank_00_model_states.pt as it is, or a copy converted to safetensors with "
                         "cli/infdit_convert.py. A broken or wrong file is refused saying what is wrong."),
            inputs=[
                io.Combo.Input("checkpoint", display_name="Inf-DiT weights",
                               options=folder_paths.get_filename_list("infdit"),
                               tooltip="The Inf-DiT file in models/infdit: mp_rank_00_model_states.pt from the "
                                       "THUDM/Inf-DiT page (a manual download), or its converted .safetensors."),
                io.Combo.Input("clip_vision", display_name="image-understanding model (CLIP)", options=clip_options(),
                               default=FROM_CHECKPOINT,
                               tooltip="The CLIP model that tells Inf-DiT what the picture shows. 'from checkpoint' "
                                       "uses the one inside the released file (keep it); the list offers only "
                                       "OpenCLIP ViT-L/14 image models found in models/infdit and models/clip_vision "
                                       "(open_clip_pytorch_model.bin of laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K), "
                                       "for a checkpoint without one."),
                io.Combo.Input("dtype", display_name="precision", options=["auto", *DTYPES], default="auto",
                               tooltip="Number format of the weights and the work: auto is bf16 where the GPU has it "
                                       "(as the model was trained), else fp16 on GPUs, fp32 on the CPU. Lower "
                                       "precision takes less memory."),
            ],
            outputs=[InfDiTModel.Output(display_name="Inf-DiT model",
                                        tooltip="The loaded upsampler, for Inf-DiT upscale.")],
        )

    @classmethod
    def validate_inputs(cls, checkpoint: str | None = None, clip_vision: str | None = None) -> bool | str:
        return refuse_unlisted(cls, {"checkpoint": checkpoint, "clip_vision": clip_vision}, {
            "checkpoint": "download mp_rank_00_model_states.pt (linked from the THUDM/Inf-DiT README) into "
                          "models/infdit, then press R to refresh the lists",
            "clip_vision": clip_hint})

    @classmethod
    def execute(cls, checkpoint: str, clip_vision: str, dtype: str) -> io.NodeOutput:
        check_choices(cls, dtype=dtype)
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
            description=("Enlarges pictures 2× or 4× (8× and 16× in two passes) and draws the new detail, to any size, "
                         "within the GPU memory you give it: the picture is built a few 128-px blocks at a time, as "
                         "many at once as fit, and comes out the same as if it were made in one go. Any size works; "
                         "transparency is kept. While it runs it shows its plan, how far it is and a preview. "
                         "Technical: Inf-DiT (arXiv 2405.04312), unidirectional block attention, block batches "
                         "sized by a memory model under the VRAM budget."),
            inputs=[
                InfDiTModel.Input("infdit_model", display_name="Inf-DiT model", tooltip="From 'Load Inf-DiT upsampler'."),
                io.Image.Input("image", tooltip="The pictures to enlarge (a batch is done one picture at a time)."),
                io.Combo.Input("scale", display_name="upscale by", options=["2", "4", "8", "16"], default="4",
                               tooltip="How many times larger. The model does 2× and 4× in one pass; 8× = 4× then 2×, "
                                       "16× = 4× twice (a 1024 px picture becomes 16384 px)."),
                io.Int.Input("steps", default=20, min=1, max=200,
                             tooltip="How carefully the detail is drawn: 20 as released. Each step runs the model "
                                     "twice over the whole picture (the last once), so time grows with steps."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the noise the detail is drawn from (the same whatever the VRAM "
                                     "budget)."),
                io.Boolean.Input("init_noise", display_name="start from the picture", default=True,
                                 tooltip="Start from the enlarged picture plus noise (as released; keeps the colours "
                                         "true) instead of pure noise."),
                io.Float.Input("vram_budget_gb", display_name="VRAM budget (GB, 0 = what is free)", default=0.0,
                               min=0.0, max=1024.0, step=0.5,
                               tooltip="GPU memory the upscale may use, the model included (GiB). More memory "
                                       "means more blocks at once, so fewer and faster passes; the result is the "
                                       "same. 0 = what is free once the model is loaded (other models are unloaded "
                                       "only if one block would not fit). A budget above what is free is lowered."),
                io.Combo.Input("scan", display_name="build order", options=list(SCAN_ORDERS), default="auto",
                               tooltip="The direction the picture is built in, batch after batch; the result is the "
                                       "same. auto goes along the shorter side, which needs the least memory."),
                io.Boolean.Input("offload_cache", display_name="use CPU RAM for big buffers", default=False,
                                 tooltip="Keep the full-picture buffers and the stored edges of finished blocks in CPU "
                                         "RAM: GPU memory then stays the same however large the picture (slower; "
                                         "about 31 GB of RAM for 16K). Switched on by itself, with the same result, "
                                         "when the VRAM budget is too small without it."),
                io.String.Input("devices", display_name="GPUs", default=AUTO_DEVICES, optional=True,
                                tooltip="Which GPUs share the work: auto = all GPUs this ComfyUI sees (one GPU: just "
                                        "that one, as usual), or a list such as cuda:0,cuda:1. Each GPU loads its own "
                                        "copy of the model and builds its own band of the picture; the VRAM budget "
                                        "applies to each; the result is the same as on one GPU."),
            ],
            outputs=[io.Image.Output(tooltip="The enlarged pictures.")],
        )

    @classmethod
    def execute(cls, infdit_model: LoadedInfDiT, image: torch.Tensor, scale: str, steps: int, seed: int,
                init_noise: bool, vram_budget_gb: float, scan: str, offload_cache: bool,
                devices: str = AUTO_DEVICES) -> io.NodeOutput:
        check_choices(cls, scale=scale, scan=scan)
        weights, patcher = infdit_model.weights, infdit_model.patcher
        targets = rank_devices(devices, patcher.load_device)
        device = patcher.load_device if targets is None else targets[0]
        size = tuple(image.shape[1:3])
        requested = vram_budget_gb * GiB if vram_budget_gb > 0 else None
        options = UpscaleOptions(scale=int(scale), steps=steps, seed=seed, init_noise=init_noise, scan=scan,
                                 offload=offload_cache, margin=allocator_headroom(device), budget_bytes=requested)
        feedback = NodeFeedback("Inf-DiT", log)
        try:
            if targets is None:
                out = cls._on_comfyuis_device(weights, patcher, image, size, options, feedback)
            else:
                out = cls._on_several_devices(infdit_model, image, size, options, targets, feedback)
        except BudgetTooSmall as error:
            raise ValueError(f"Inf-DiT: {error}") from error
        except RankFailed as error:
            raise RuntimeError(f"Inf-DiT on {', '.join(map(str, targets))}: {error}") from error
        feedback.finish(f"finished: {out.shape[-1]}×{out.shape[-2]} in {feedback.elapsed()}")
        return io.NodeOutput(out.movedim(1, -1).to(mm.intermediate_device()))

    @staticmethod
    def _on_comfyuis_device(weights: InfDiTWeights, patcher, image: torch.Tensor, size: tuple[int, int],
                            options: UpscaleOptions, feedback: NodeFeedback) -> torch.Tensor:
        device = patcher.load_device
        # Ask ComfyUI for the memory the plan needs, unloading other models if it must;
        # then plan with what is really free.
        mm.load_models_gpu([patcher], memory_required=working_memory(weights, size, options), force_full_load=True)
        free, host_free = free_device_memory(patcher, device), mm.get_free_memory(torch.device("cpu"))
        plan = plan_budget(weights, size, options, free, host_free)
        for level, message in plan.messages:
            log.log(level, "Inf-DiT: %s", message)
        feedback.announce(plan.describe(size, image.shape[0], memory=memory_name(device)))
        canvas = PreviewCanvas(weights.net.cfg.block_px, feedback.preview_side) if feedback.wants_previews else None

        def on_step(step: UpscaleStep) -> None:
            feedback.progress(step.done, step.total, canvas.image if canvas is not None else None)
            feedback.status(step.describe(), step.done, step.total)

        return upscale(weights, image.movedim(-1, 1), plan.options, device, check_interrupt=check_interrupt,
                       on_step=on_step, preview=canvas)

    @staticmethod
    def _on_several_devices(model: LoadedInfDiT, image: torch.Tensor, size: tuple[int, int], options: UpscaleOptions,
                            targets: list[torch.device], feedback: NodeFeedback) -> torch.Tensor:
        weights, ranks = model.weights, len(targets)
        # Each rank loads its own copy of the weights and plans with what its GPU has free:
        # make room through model management on the GPUs where ComfyUI keeps models (asking
        # about the others here would put a CUDA context on each of them in this process).
        need = weight_bytes(weights) + working_memory(weights, size, options, ranks)
        for device in _devices_with_comfyui_models(targets):
            mm.free_memory(need, device)
        log.info("Inf-DiT: %d ranks on %s", ranks, ", ".join(map(str, targets)))
        statuses: list[str | None] = []
        names = [str(device) for device in targets]
        if len(set(names)) < len(names):  # CPU ranks
            names = [f"rank {rank} ({name})" for rank, name in enumerate(names)]

        def on_progress(done: int, total: int) -> None:
            feedback.progress(done, total)
            lines = [f"{name}: {line}" for name, line in zip(names, statuses) if line]
            feedback.status("\n".join(lines + [f"{done}/{total} batches on all devices"]), done, total)

        previews = {"on_preview": feedback.show_preview} if feedback.wants_previews else {}
        try:
            return upscale_on_ranks(model.source, image.movedim(-1, 1), options, targets, on_progress=on_progress,
                                    on_plan=feedback.announce, on_status=lambda lines: statuses.__setitem__(
                                        slice(None), lines), check_interrupt=check_interrupt, **previews)
        finally:
            mm.soft_empty_cache()


def _devices_with_comfyui_models(targets: list[torch.device]) -> list[torch.device]:
    """The GPUs among ``targets`` that ComfyUI computes on or keeps loaded models on."""
    used = [mm.get_torch_device()] + [loaded.device for loaded in getattr(mm, "current_loaded_models", [])
                                      if getattr(loaded, "device", None) is not None]
    return [device for device in targets
            if device.type == "cuda" and any(_same_device(device, torch.device(other)) for other in used)]


NODES: list[type[io.ComfyNode]] = [UltraResInfDiTLoader, UltraResInfDiTUpscale]
