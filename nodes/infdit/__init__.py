"""Inf-DiT in ComfyUI: the loader and the block-scheduled upscale node (:mod:`.nodes`)."""

from .nodes import NODES

__all__ = ["NODES"]
