"""The pack's own ModelPatchers (GSPN modules, Inf-DiT) and the free memory their work may use,
on ComfyUI with and without Dynamic VRAM.

Newer ComfyUI names the patcher class it builds its models with ``comfy.model_patcher.CoreModelPatcher``
(``ModelPatcher`` by default; ``ModelPatcherDynamic`` once ``main.py`` has enabled comfy-aimdo,
the default on NVIDIA). One plain ``ModelPatcher`` among the models of a load sends the whole
load down the non-dynamic path, so the pack's patchers use the same class. Its
``get_free_memory`` also counts the VRAM that Dynamic VRAM frees on demand, which core asks
code that sizes work to use instead of ``model_management.get_free_memory``. Older ComfyUI
(0.3.x) has neither: plain ``ModelPatcher`` and ``model_management`` are used there.
"""

from __future__ import annotations

import comfy.model_management
import comfy.model_patcher
import torch


def new_patcher(module: torch.nn.Module, load_device: torch.device,
                offload_device: torch.device) -> comfy.model_patcher.ModelPatcher:
    """A patcher for ``module`` of the class ComfyUI builds its own models with (read at call time:
    ``main.py`` switches it after the pack is imported)."""
    patcher_class = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    return patcher_class(module, load_device=load_device, offload_device=offload_device)


def free_device_memory(patcher: comfy.model_patcher.ModelPatcher, device: torch.device) -> int:
    """Bytes free for work on ``device`` next to ``patcher``'s model: the patcher's own reading where
    the host has one, model management's elsewhere."""
    reading = getattr(patcher, "get_free_memory", None)
    if reading is None:
        return int(comfy.model_management.get_free_memory(device))
    return int(reading(device))
