"""The one ``optimized_attention_override`` slot a model's transformer options have, shared with
other nodes: who is in it, in words a user can act on.

ComfyUI calls whatever sits in ``transformer_options["optimized_attention_override"]`` instead
of its attention backend (``comfy/ldm/modules/attention.py: wrap_attn``). Newer ComfyUI fills
the slot itself: the *Model Attention Backend* node through
``ModelPatcher.set_model_optimized_attention`` (a closure that calls one backend and ignores
the one ComfyUI chose) and the *Model Sparse Attention* node
(``comfy_extras/nodes_sparse_attention.py``), which chains to the previous occupant and puts
itself back on top at every sampling step.
"""

from __future__ import annotations

from collections.abc import Callable

OVERRIDE_KEY = "optimized_attention_override"
SPARSE_ATTENTION_MODULE = "nodes_sparse_attention"
BACKEND_SETTER = "set_model_optimized_attention.<locals>.optimized_attention_override"


def _module_stem(module: str) -> str:
    """``comfy_extras.nodes_sparse_attention`` and ``/x/comfy_extras/nodes_sparse_attention`` (how
    ComfyUI names modules it loads from a file) both give ``nodes_sparse_attention``."""
    return module.replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[-1]


def _closure_function_name(function: Callable) -> str | None:
    for cell in getattr(function, "__closure__", None) or ():
        name = getattr(cell.cell_contents, "__name__", None)
        if name is not None and callable(cell.cell_contents):
            return name
    return None


def describe_override(override: Callable | None) -> str:
    """What sits in the override slot, named after the node that put it there where known."""
    if override is None:
        return "no override (a later node removed CLEAR's)"
    module = getattr(override, "__module__", None) or type(override).__module__
    qualname = getattr(override, "__qualname__", None) or type(override).__qualname__
    if _module_stem(module) == SPARSE_ATTENTION_MODULE:
        return "core's Model Sparse Attention node (comfy_extras/nodes_sparse_attention.py)"
    if qualname.endswith(BACKEND_SETTER):
        backend = _closure_function_name(override) or "unknown"
        return ("an attention backend set through ModelPatcher.set_model_optimized_attention, as core's "
                f"Model Attention Backend node does ({backend})")
    return f"another node's attention override ({module}.{qualname})"
