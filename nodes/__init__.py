"""ComfyUI glue: the V3 node classes of the pack and the extension that lists them.

Each method has one module here (``clear``, ``gspn``, ``infdit``) that only converts
between ComfyUI objects and the host-free core in ``kernels/`` and ``models/``.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .clear import NODES as CLEAR_NODES
from .clear_distill import NODES as CLEAR_DISTILL_NODES
from .gspn import NODES as GSPN_NODES
from .infdit import NODES as INFDIT_NODES

NODE_LIST: list[type[io.ComfyNode]] = [*CLEAR_NODES, *CLEAR_DISTILL_NODES, *GSPN_NODES, *INFDIT_NODES]


class UltraResExtension(ComfyExtension):
    """The pack's V3 extension: ComfyUI reads the node list from it at start-up."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_LIST)
