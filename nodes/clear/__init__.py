"""CLEAR in ComfyUI: the patch node and the hooks it puts on a clone of a Flux model."""
