"""UltraRes: CLEAR, GSPN and Inf-DiT for 4K-16K images in ComfyUI.

ComfyUI imports this file from ``custom_nodes/`` and calls :func:`comfy_entrypoint`
(the V3 extension API). Nothing is imported from ComfyUI at import time, so the host-free
core (``kernels``, ``models``) can be imported and tested without ComfyUI.
"""

__version__ = "0.1.0"


async def comfy_entrypoint():
    """Register the pack's model folders and return its V3 extension (ComfyUI calls this once)."""
    from .nodes import UltraResExtension
    from .nodes.model_folders import register_model_folders

    register_model_folders()
    return UltraResExtension()
