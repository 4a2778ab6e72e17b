"""Fit the example workflows' layout to what ComfyUI's frontend draws: every node with plain
widgets gets the height LiteGraph gives it and at least the width its labels and values need,
the nodes of a column are stacked again with even gaps, the columns to the right move over by
what a column grew, the stages (groups) are fitted around their nodes, and the starting view
shows the whole graph (``extra.ds``).

    python scripts/workflow_layout.py            # rewrite workflows/*.json
    python scripts/workflow_layout.py --check    # exit 1 if a file would change

Then refresh the API twins and thumbnails (``scripts/workflow_snapshots.py twins``,
``scripts/render_thumbnails.py``). The rules live in ``tests/workflow_layout.py``, which the
tests check the files against.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import workflow_graph as wg  # noqa: E402
import workflow_layout as wl  # noqa: E402

STACK_GAP = 24
"""Space between a node and the title bar of the node below it."""
GROUP_PADDING = 20
"""Space between a stage's last node and its bottom edge."""


def _fit_sizes(workflow: dict, definitions: dict[str, wg.NodeDef]) -> dict[int, int]:
    """Fit each plain node; returns how much wider each node became, by id."""
    grown = {}
    for node in workflow["nodes"]:
        definition = definitions.get(node["type"])
        if wl.is_self_sized(node, definition):
            continue
        width, height = wl.fitted_size(node, definition)
        grown[node["id"]] = max(0, width - node["size"][0])
        node["size"] = [max(node["size"][0], width), height]
    return grown


def _move_columns(workflow: dict, grown: dict[int, int]) -> None:
    """Move what lies right of a grown column over by its growth (columns: nodes at one x)."""
    growth: dict[float, int] = {}
    for node in workflow["nodes"]:
        x = node["pos"][0]
        growth[x] = max(growth.get(x, 0), grown.get(node["id"], 0))

    def shift(x: float) -> int:
        return sum(amount for column, amount in growth.items() if column < x)

    for group in workflow["groups"]:
        left, top, width, height = group["bounding"]
        right = left + width
        group["bounding"] = [left + shift(left), top, width + shift(right) - shift(left), height]
    for node in workflow["nodes"]:
        node["pos"] = [node["pos"][0] + shift(node["pos"][0]), node["pos"][1]]


def _stack_columns(workflow: dict) -> None:
    """Close the gaps the shorter nodes left: each column top to bottom, evenly spaced."""
    columns: dict[float, list[dict]] = {}
    for node in workflow["nodes"]:
        columns.setdefault(node["pos"][0], []).append(node)
    for nodes in columns.values():
        nodes.sort(key=lambda node: node["pos"][1])
        for above, below in zip(nodes, nodes[1:]):
            y = above["pos"][1] + above["size"][1] + wl.NODE_TITLE_HEIGHT + STACK_GAP
            below["pos"] = [below["pos"][0], y]


def _fit_groups(workflow: dict) -> None:
    """Each stage ends :data:`GROUP_PADDING` below the lowest node inside it (its notes too)."""
    for group in workflow["groups"]:
        left, top, width, height = group["bounding"]
        inside = [node for node in workflow["nodes"]
                  if left <= node["pos"][0] and node["pos"][0] + node["size"][0] <= left + width
                  and top <= node["pos"][1] <= top + height]
        if inside:
            bottom = max(node["pos"][1] + node["size"][1] for node in inside)
            group["bounding"] = [left, top, width, bottom + GROUP_PADDING - top]


def laid_out(workflow: dict, definitions: dict[str, wg.NodeDef]) -> dict:
    """The workflow with its layout fitted (a new dict; the input is left as it is)."""
    workflow = json.loads(json.dumps(workflow))
    _move_columns(workflow, _fit_sizes(workflow, definitions))
    _stack_columns(workflow)
    _fit_groups(workflow)
    workflow.setdefault("extra", {})["ds"] = wl.starting_view(workflow)
    return workflow


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only say which files would change")
    args = parser.parse_args(argv)
    definitions = wg.load_definitions()
    stale = []
    for path in wg.workflow_paths():
        workflow = wg.load_workflow(path)
        fitted = laid_out(workflow, definitions)
        if fitted == workflow:
            continue
        stale.append(path)
        if not args.check:
            path.write_text(wg.dump_json(fitted), encoding="utf-8")
            print(f"wrote {path}")
    if args.check and stale:
        print("out of date: " + ", ".join(path.name for path in stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
