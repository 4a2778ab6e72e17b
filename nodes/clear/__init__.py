"""CLEAR in ComfyUI: the patch, several-devices and distill nodes (:mod:`.nodes`), the hooks the
patch puts on a clone of a Flux model (:mod:`.hooks`), who holds the model's attention-override
slot (:mod:`.override_slot`), the stripe-parallel run over several devices (:mod:`.devices`) and
the distillation's host (:mod:`.distillation`)."""

from .nodes import NODES

__all__ = ["NODES"]
