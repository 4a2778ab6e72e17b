"""GSPN in ComfyUI: the patch and distillation nodes (:mod:`.nodes`), the ``attn1`` patches that
put the modules into a model (:mod:`.patch`) and the distillation driven through ComfyUI's own
sampling (:mod:`.distillation`, shared with ``cli/gspn_distill.py``)."""

from .nodes import NODES

__all__ = ["NODES"]
