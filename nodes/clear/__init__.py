"""CLEAR in ComfyUI: the patch node (:mod:`.nodes`), the hooks it puts on a clone of a Flux
model (:mod:`.hooks`) and who holds the model's attention-override slot (:mod:`.override_slot`)."""

from .nodes import NODES

__all__ = ["NODES"]
