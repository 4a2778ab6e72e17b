"""ComfyUI glue: the V3 node classes of the pack and the extension that lists them.

One subpackage per method (``clear/``, ``gspn/``, ``infdit/``): ``nodes.py`` holds its node
classes (inputs, tooltips, ``execute``), the modules beside it the ComfyUI hooks they install;
all of them only convert between ComfyUI objects and the host-free core in ``kernels/`` and
``models/``. Shared by all: ``category`` (the menu), ``model_folders`` (``models/clear`` ...),
``patchers`` (the pack's ModelPatchers and free memory), ``runtime`` (progress and cancel) and
``training`` (the teacher run through ComfyUI's sampling, for the distillation nodes).
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .clear import NODES as CLEAR_NODES
from .gspn import NODES as GSPN_NODES
from .infdit import NODES as INFDIT_NODES

NODE_LIST: list[type[io.ComfyNode]] = [*CLEAR_NODES, *GSPN_NODES, *INFDIT_NODES]


class UltraResExtension(ComfyExtension):
    """The pack's V3 extension: ComfyUI reads the node list from it at start-up."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_LIST)
