"""Inf-DiT in ComfyUI: the loader and the block-scheduled upscale node."""
