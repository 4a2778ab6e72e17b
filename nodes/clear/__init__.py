"""CLEAR in ComfyUI: the patch node and the several-devices node (:mod:`.nodes`), the hooks the
patch puts on a clone of a Flux model (:mod:`.hooks`), who holds the model's attention-override
slot (:mod:`.override_slot`) and the stripe-parallel run over several devices (:mod:`.devices`)."""

from .nodes import NODES

__all__ = ["NODES"]
