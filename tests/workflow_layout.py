"""How ComfyUI's frontend lays out a node and the first view of a graph, for the example workflows:
node sizes that fit their widgets (no empty space below them, no label or value cut short) and a
starting view that shows the whole graph.

The sizes follow LiteGraph's ``LGraphNode.computeSize`` in the frontend ComfyUI 0.3.64 ships
(comfyui-frontend-package 1.27): a row of 20 px per socket row (the larger of the linked inputs
and the outputs), 20 px + 4 px per widget, 8 px below the widgets and 6 px at the bottom.
Widgets the frontend draws as page elements (multi-line text, notes, image previews) size
themselves: those nodes are left as they are. Widths are estimated with a mean character width
of the 12 px widget font, as the frontend estimates text before it can measure it.
"""

from __future__ import annotations

import math
from typing import Any

from workflow_graph import NOTE_TYPES, NodeDef, widget_values

SLOT_HEIGHT = 20
WIDGET_HEIGHT = 20
WIDGET_GAP = 4
WIDGETS_BOTTOM = 8
NODE_BOTTOM = 6
NODE_TITLE_HEIGHT = 30
CHAR_WIDTH = 7.0
"""Mean width of a character of the widget font, generous (12 px sans-serif)."""
WIDGET_CHROME = 2 * 15 + 2 * (6 + 10) + 12
"""A widget's margins, its two arrows and the gap between its label and its value."""
MIN_WIDTH = 210
"""``NODE_WIDTH`` x 1.5: the narrowest node with widgets."""
VIEWPORT = (1840, 960)
"""The canvas of a 1920 x 1080 screen, less the frontend's menu bar and side bar."""
VIEW_MARGIN = 20
READABLE_SCALE = 0.58
"""The smallest starting zoom at which the frontend still draws the nodes' text: below 8/14 it
draws them as plain boxes (setting "LiteGraph.Canvas.MinFontSizeForLOD", 8 px by default, over
the 14 px node font)."""

SELF_SIZED = frozenset({"CLIPTextEncode", "LoadImage", "PreviewImage", "SaveImage"}) | NOTE_TYPES
"""Node types with widgets the frontend draws as page elements, which size themselves."""


def is_self_sized(node: dict, definition: NodeDef | None) -> bool:
    if node["type"] in SELF_SIZED or definition is None:
        return True
    return any(item.type == "STRING" and item.options.get("multiline") for item in definition.widgets)


def _label(item) -> str:
    return str(item.options.get("display_name") or item.name)


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def fitted_size(node: dict, definition: NodeDef) -> tuple[int, int]:
    """The size a node with plain widgets needs: as tall as LiteGraph makes it, as wide as its
    longest widget label with its value (and its title)."""
    sockets = [slot for slot in node.get("inputs") or [] if "widget" not in slot]
    rows = max(len(sockets), len(node.get("outputs") or []), 1)
    widgets = len(node.get("widgets_values") or [])
    height = rows * SLOT_HEIGHT + widgets * (WIDGET_HEIGHT + WIDGET_GAP) + (WIDGETS_BOTTOM if widgets else 0)
    values = widget_values(node, definition)
    texts = [len(_label(item)) + len(_value_text(values[item.name])) for item in definition.widgets]
    title = node.get("title") or definition.display_name
    width = max([MIN_WIDTH, NODE_TITLE_HEIGHT * 1.33 + len(title) * CHAR_WIDTH]
                + [count * CHAR_WIDTH + WIDGET_CHROME for count in texts])
    return int(math.ceil(width / 10) * 10), height + NODE_BOTTOM


def node_box(node: dict) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a node as drawn: LiteGraph puts its title bar above its position."""
    (x, y), (width, height) = node["pos"], node["size"]
    return x, y - NODE_TITLE_HEIGHT, x + width, y + height


def bounds(workflow: dict) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of every node (its title bar included) and every group."""
    boxes = [node_box(node) for node in workflow["nodes"]]
    boxes += [(x, y, x + w, y + h) for x, y, w, h in (g["bounding"] for g in workflow["groups"])]
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def starting_view(workflow: dict) -> dict:
    """``extra.ds`` that shows the whole graph, centred, as large as :data:`VIEWPORT` allows (at
    most 1:1). The canvas shows graph point ``p`` at ``(p + offset) * scale``."""
    left, top, right, bottom = bounds(workflow)
    width, height = right - left + 2 * VIEW_MARGIN, bottom - top + 2 * VIEW_MARGIN
    scale = math.floor(min(1.0, VIEWPORT[0] / width, VIEWPORT[1] / height) * 100) / 100
    offset = [round((VIEWPORT[0] / scale - (right - left)) / 2 - left), round((VIEWPORT[1] / scale - (bottom - top)) / 2 - top)]
    return {"scale": scale, "offset": offset}


def on_screen(workflow: dict, view: dict) -> tuple[float, float, float, float]:
    """Where the graph's bounds land on the canvas under ``view``."""
    left, top, right, bottom = bounds(workflow)
    (dx, dy), scale = view["offset"], view["scale"]
    return (left + dx) * scale, (top + dy) * scale, (right + dx) * scale, (bottom + dy) * scale
