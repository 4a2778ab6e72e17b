"""ComfyUI workflows in their two formats, checked against node definitions from ``/object_info``.

- UI format (``workflows/*.json``, what the frontend's Save writes): nodes with input and
  output slots, links ``[id, origin, origin_slot, target, target_slot, type]`` and positional
  ``widgets_values``.
- API format (what ``POST /prompt`` takes): ``{id: {"class_type", "inputs", "_meta"}}`` with
  named widget values and links as ``[origin_id, origin_slot]``.

:func:`ui_to_api` does what the frontend does when it queues a graph (its graph-to-prompt
step), so the API twins under ``tests/workflows/`` are derived from the UI files and cannot
drift. The definitions come from a committed snapshot of ``/object_info``
(``tests/workflows/node_definitions.json``): ComfyUI is not installable in CI.
Nothing here imports ComfyUI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_DIR = REPO_ROOT / "workflows"
TWIN_DIR = Path(__file__).resolve().parent / "workflows"
DEFINITIONS_PATH = TWIN_DIR / "node_definitions.json"
LABELS_PATH = REPO_ROOT / "locales" / "en" / "nodeDefs.json"
PACK_PREFIX = "UltraRes"
API_SUFFIX = ".api.json"

# Frontend-only nodes: never sent to the server, absent from /object_info.
NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
REROUTE = "Reroute"
FRONTEND_ONLY = NOTE_TYPES | {REROUTE}

# Node modes (LiteGraph): 0 = always, 2 = never (muted), 4 = bypass.
MODE_ALWAYS, MODE_MUTED, MODE_BYPASS = 0, 2, 4

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
# The frontend adds a "control after generate" widget after these INT inputs; it is saved in
# widgets_values but never sent to the server.
SEED_NAMES = frozenset({"seed", "noise_seed"})
CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})
# The snapshot is taken on a ComfyUI whose model and input folders hold one file with this
# name each: the combos that list it are file lists (any file name is valid there).
FILE_PROBE = "ultrares_snapshot_probe"

# Keys of an /object_info entry the checks use; tooltips and descriptions are left out of
# the snapshot, as is python_module (it names the folder the pack was installed in).
DEFINITION_KEYS = ("name", "display_name", "category", "output_node", "input", "input_order", "output",
                   "output_name", "output_is_list")
DROPPED_OPTIONS = frozenset({"tooltip"})


class WorkflowError(ValueError):
    """A workflow that does not fit the node definitions."""


@dataclass(frozen=True)
class InputDef:
    """One input of a node definition."""

    name: str
    type: str                      # "INT", "MODEL", ... ; "COMBO" for choice lists
    options: dict[str, Any]
    required: bool
    choices: tuple[Any, ...] | None = None   # COMBO values, as the snapshot saw them

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.options.get("forceInput", False)

    @property
    def widget_slots(self) -> int:
        """How many ``widgets_values`` entries this input takes (0 for a socket)."""
        if not self.is_widget:
            return 0
        return 2 if self.has_control or self.has_upload else 1

    @property
    def has_control(self) -> bool:
        return self.type == "INT" and (bool(self.options.get("control_after_generate")) or self.name in SEED_NAMES)

    @property
    def has_upload(self) -> bool:
        return any(value for key, value in self.options.items() if key.endswith("_upload"))

    @property
    def is_file_list(self) -> bool:
        return self.type == "COMBO" and any(_is_probe(choice) for choice in self.choices)

    @property
    def fixed_choices(self) -> tuple[Any, ...]:
        """The COMBO values that are not file names (e.g. "none", "pixel_space")."""
        return tuple(choice for choice in self.choices or () if not _is_probe(choice))


def _is_probe(choice: Any) -> bool:
    return isinstance(choice, str) and FILE_PROBE in choice


@dataclass(frozen=True)
class NodeDef:
    """A node class as ``/object_info`` describes it."""

    name: str
    display_name: str
    inputs: tuple[InputDef, ...]
    outputs: tuple[str, ...]
    output_names: tuple[str, ...]
    output_node: bool
    raw: dict = field(compare=False, repr=False)

    def input(self, name: str) -> InputDef | None:
        return next((item for item in self.inputs if item.name == name), None)

    @property
    def widgets(self) -> tuple[InputDef, ...]:
        return tuple(item for item in self.inputs if item.is_widget)


def _input_def(name: str, spec: list, required: bool) -> InputDef:
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {}) or {}
    if isinstance(kind, list):          # classic combo: [[choices...], {...}]
        return InputDef(name, "COMBO", options, required, tuple(kind))
    if kind == "COMBO":                 # V3 combo: ["COMBO", {"options": [...]}]
        return InputDef(name, "COMBO", options, required, tuple(options.get("options", ())))
    return InputDef(name, kind, options, required)


def node_def(raw: dict) -> NodeDef:
    """A :class:`NodeDef` from one ``/object_info`` entry (inputs in the frontend's widget order)."""
    inputs = []
    for group, required in (("required", True), ("optional", False)):
        specs = raw.get("input", {}).get(group, {})
        order = raw.get("input_order", {}).get(group, list(specs))
        inputs += [_input_def(name, specs[name], required) for name in order]
    return NodeDef(raw["name"], raw.get("display_name") or raw["name"], tuple(inputs), tuple(raw.get("output", ())),
                   tuple(raw.get("output_name", ())), bool(raw.get("output_node")), raw)


def snapshot_entry(raw: dict) -> dict:
    """The part of an ``/object_info`` entry kept in the snapshot (no tooltips or descriptions)."""
    entry = {key: raw[key] for key in DEFINITION_KEYS if key in raw}
    for group in ("required", "optional"):
        specs = entry.get("input", {}).get(group)
        if specs is None:
            continue
        entry["input"] = {**entry["input"], group: {name: _strip_spec(spec) for name, spec in specs.items()}}
    if "input" in entry:
        entry["input"] = {key: value for key, value in entry["input"].items() if key != "hidden"}
    if "input_order" in entry:
        entry["input_order"] = {key: value for key, value in entry["input_order"].items() if key != "hidden"}
    return entry


def _strip_spec(spec: list) -> list:
    if len(spec) < 2 or not isinstance(spec[1], dict):
        return list(spec)
    return [spec[0], {key: value for key, value in spec[1].items() if key not in DROPPED_OPTIONS}, *spec[2:]]


def interface_differences(snapshot: dict, live: dict) -> list[str]:
    """How a live ``/object_info`` entry (passed through :func:`snapshot_entry`) differs from the
    snapshot's. File lists are compared by their fixed entries: the files differ per install."""
    problems = [f"{key}: {snapshot.get(key)!r} != {live.get(key)!r}" for key in DEFINITION_KEYS
                if key != "input" and snapshot.get(key) != live.get(key)]
    ours, theirs = node_def(snapshot).inputs, node_def(live).inputs
    if [item.name for item in ours] != [item.name for item in theirs]:
        return problems + [f"inputs {[i.name for i in ours]} != {[i.name for i in theirs]}"]
    for mine, other in zip(ours, theirs):
        if mine.is_file_list:
            # A default that is a file (the first in the folder) follows the folder's contents too.
            file_default = _is_probe(mine.options.get("default"))
            same = (mine.type, _without_choices(mine.options, file_default), mine.required) == (
                other.type, _without_choices(other.options, file_default), other.required) and (
                set(mine.fixed_choices) <= set(other.choices or ())) and (
                not file_default or other.options.get("default") in (other.choices or ()))
        else:
            same = mine == other
        if not same:
            problems.append(f"input {mine.name}: {mine} != {other}")
    return problems


def compatibility_differences(snapshot: dict, live: dict) -> list[str]:
    """What a live ``/object_info`` entry of *another* ComfyUI version (passed through
    :func:`snapshot_entry`) breaks of what the workflows rely on in the snapshot's entry.

    Versions move core nodes (new optional inputs and outputs, changed defaults, longer choice
    lists), so this is a subset check rather than equality: every snapshot input is still there
    with its type, required-ness and choices; any new input is optional; the snapshot's widgets
    stay the first widgets in their order (UI files store widget values by position); the
    snapshot's outputs lead the live ones. Names and categories may change.
    """
    ours, theirs = node_def(snapshot), node_def(live)
    problems = []
    if theirs.outputs[:len(ours.outputs)] != ours.outputs:
        problems.append(f"outputs {list(ours.outputs)} are not the first of {list(theirs.outputs)}")
    if ours.output_node != theirs.output_node:
        problems.append(f"output_node {ours.output_node} != {theirs.output_node}")
    for mine in ours.inputs:
        other = theirs.input(mine.name)
        if other is None:
            problems.append(f"input {mine.name} is gone")
        elif (mine.type, mine.required) != (other.type, other.required):
            problems.append(f"input {mine.name}: {mine.type} required={mine.required} is now "
                            f"{other.type} required={other.required}")
        elif mine.type == "COMBO":
            expected = mine.fixed_choices if mine.is_file_list else mine.choices
            missing = [choice for choice in expected if choice not in (other.choices or ())]
            if missing:
                problems.append(f"input {mine.name}: choices {missing} are gone")
    known = {item.name for item in ours.inputs}
    problems += [f"new required input {item.name}" for item in theirs.inputs if item.required and item.name not in known]
    widgets = [item.name for item in ours.widgets]
    if [item.name for item in theirs.widgets][:len(widgets)] != widgets:
        problems.append(f"widgets {widgets} are not the first of {[item.name for item in theirs.widgets]}")
    return problems


def snapshot_version(path: Path = DEFINITIONS_PATH) -> str:
    """The ComfyUI version the snapshot was taken from."""
    return json.loads(path.read_text())["comfyui_version"]


def _without_choices(options: dict, default: bool = False) -> dict:
    """``options`` without the choice list (and without the default, if ``default``)."""
    dropped = {"options", "default"} if default else {"options"}
    return {key: value for key, value in options.items() if key not in dropped}


def load_definitions(path: Path = DEFINITIONS_PATH) -> dict[str, NodeDef]:
    """The committed snapshot of node definitions, by class name."""
    return {name: node_def(raw) for name, raw in json.loads(path.read_text())["nodes"].items()}


def node_labels(definitions: dict[str, NodeDef]) -> dict:
    """The pack's ``locales/en/nodeDefs.json``: each pack node's name and its inputs' labels.

    The frontend ComfyUI 0.3.64 ships (1.27) labels a widget or socket with the translation
    ``nodeDefs.<node>.inputs.<input>.name`` from ``/i18n`` (which serves the custom nodes'
    ``locales/<language>/nodeDefs.json``), else with the input's id: it does not read a V3
    input's ``display_name``. So the labels the nodes declare are shipped there too.
    """
    labels = {}
    for name in sorted(definitions):
        if not name.startswith(PACK_PREFIX):
            continue
        definition = definitions[name]
        inputs = {item.name: {"name": item.options["display_name"]} for item in definition.inputs
                  if item.options.get("display_name")}
        labels[name] = {"display_name": definition.display_name, **({"inputs": inputs} if inputs else {})}
    return labels


def load_workflow(path: Path) -> dict:
    return json.loads(path.read_text())


def workflow_paths() -> list[Path]:
    return sorted(WORKFLOW_DIR.glob("*.json"))


def twin_path(workflow: Path) -> Path:
    return TWIN_DIR / (workflow.stem + API_SUFFIX)


def nodes_by_id(workflow: dict) -> dict[int, dict]:
    return {node["id"]: node for node in workflow["nodes"]}


def links_by_id(workflow: dict) -> dict[int, list]:
    return {link[0]: link for link in workflow["links"]}


def widget_values(node: dict, definition: NodeDef) -> dict[str, Any]:
    """The node's positional ``widgets_values`` by input name (control and upload entries dropped)."""
    values = list(node.get("widgets_values") or [])
    expected = sum(item.widget_slots for item in definition.widgets)
    if len(values) != expected:
        names = [item.name for item in definition.widgets]
        raise WorkflowError(f"node {node['id']} ({node['type']}): {len(values)} widget values for {expected} "
                            f"widget slots ({', '.join(names)})")
    named, position = {}, 0
    for item in definition.widgets:
        named[item.name] = values[position]
        position += item.widget_slots
    return named


def control_values(node: dict, definition: NodeDef) -> dict[str, Any]:
    """The extra entry saved after each seed-like widget ("fixed", "randomize", ...)."""
    values, position, extra = list(node.get("widgets_values") or []), 0, {}
    for item in definition.widgets:
        if item.has_control:
            extra[item.name] = values[position + 1]
        position += item.widget_slots
    return extra


def widget_problem(item: InputDef, value: Any) -> str | None:
    """Why ``value`` is not valid for the widget ``item`` (None if it is)."""
    options = item.options
    if item.type == "INT" and (not isinstance(value, int) or isinstance(value, bool)):
        return f"{value!r} is not an integer"
    if item.type == "FLOAT" and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        return f"{value!r} is not a number"
    if item.type in ("INT", "FLOAT"):
        if "min" in options and value < options["min"]:
            return f"{value!r} is below the minimum {options['min']}"
        if "max" in options and value > options["max"]:
            return f"{value!r} is above the maximum {options['max']}"
    if item.type == "BOOLEAN" and not isinstance(value, bool):
        return f"{value!r} is not a boolean"
    if item.type == "STRING" and not isinstance(value, str):
        return f"{value!r} is not a string"
    if item.type == "COMBO" and value not in item.fixed_choices:
        if not item.is_file_list:
            return f"{value!r} is not one of {list(item.choices)}"
        if not isinstance(value, str) or not value:
            return f"{value!r} is not a file name"
    return None


def check_widgets(workflow: dict, definitions: dict[str, NodeDef]) -> list[str]:
    """Every widget value of every server-side node is valid for its input."""
    problems = []
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        definition = definitions.get(node["type"])
        if definition is None:
            problems.append(f"node {node['id']}: unknown node type {node['type']}")
            continue
        try:
            named = widget_values(node, definition)
        except WorkflowError as error:
            problems.append(str(error))
            continue
        for name, value in named.items():
            why = widget_problem(definition.input(name), value)
            if why:
                problems.append(f"node {node['id']} ({node['type']}).{name}: {why}")
        for name, value in control_values(node, definition).items():
            if value not in CONTROL_VALUES:
                problems.append(f"node {node['id']} ({node['type']}).{name}: control value {value!r}")
    return problems


def _output_type(node: dict, slot: int, definitions: dict[str, NodeDef]) -> str | None:
    if node["type"] == REROUTE:
        return node["outputs"][0]["type"] if node.get("outputs") else None
    definition = definitions.get(node["type"])
    if definition is None or slot >= len(definition.outputs):
        return None
    return definition.outputs[slot]


def check_links(workflow: dict, definitions: dict[str, NodeDef]) -> list[str]:
    """Links and slots agree with each other and with the node definitions.

    Each link's origin output and target input exist, name the link, and have the link's
    type; each input slot is an input of the node's definition with that type; every required
    socket input is connected.
    """
    problems = []
    nodes, links = nodes_by_id(workflow), links_by_id(workflow)
    if len(links) != len(workflow["links"]):
        problems.append("duplicate link ids")
    for link_id, origin_id, origin_slot, target_id, target_slot, kind in workflow["links"]:
        origin, target = nodes.get(origin_id), nodes.get(target_id)
        if origin is None or target is None:
            problems.append(f"link {link_id}: node {origin_id if origin is None else target_id} does not exist")
            continue
        outputs, inputs = origin.get("outputs") or [], target.get("inputs") or []
        if origin_slot >= len(outputs) or link_id not in (outputs[origin_slot].get("links") or []):
            problems.append(f"link {link_id}: output {origin_slot} of node {origin_id} does not list it")
        elif outputs[origin_slot]["type"] != kind:
            problems.append(f"link {link_id}: type {kind} but output {origin_slot} of node {origin_id} is "
                            f"{outputs[origin_slot]['type']}")
        defined = _output_type(origin, origin_slot, definitions)
        if defined is not None and defined != kind:
            problems.append(f"link {link_id}: type {kind} but {origin['type']} output {origin_slot} is {defined}")
        if target_slot >= len(inputs) or inputs[target_slot].get("link") != link_id:
            problems.append(f"link {link_id}: input {target_slot} of node {target_id} does not name it")
        elif inputs[target_slot]["type"] not in (kind, "*"):
            problems.append(f"link {link_id}: type {kind} into {target['type']}.{inputs[target_slot]['name']} "
                            f"of type {inputs[target_slot]['type']}")
    for node in workflow["nodes"]:
        problems += _slot_problems(node, definitions.get(node["type"]), links)
    return problems


def _slot_problems(node: dict, definition: NodeDef | None, links: dict[int, list]) -> list[str]:
    label = f"node {node['id']} ({node['type']})"
    problems = []
    for item in node.get("inputs") or []:
        if item.get("link") is not None and item["link"] not in links:
            problems.append(f"{label}: input {item['name']} names missing link {item['link']}")
    for slot, item in enumerate(node.get("outputs") or []):
        for link_id in item.get("links") or []:
            link = links.get(link_id)
            if link is None or link[1] != node["id"] or link[2] != slot:
                problems.append(f"{label}: output {slot} names link {link_id}, which does not start there")
    if node["type"] in FRONTEND_ONLY or definition is None:
        return problems
    for item in node.get("inputs") or []:
        spec = definition.input(item["name"])
        if spec is None:
            problems.append(f"{label}: no input named {item['name']}")
        elif spec.type != item["type"]:
            problems.append(f"{label}: input {item['name']} is {item['type']}, defined as {spec.type}")
    connected = {item["name"] for item in node.get("inputs") or [] if item.get("link") is not None}
    for spec in definition.inputs:
        if spec.required and not spec.is_widget and spec.name not in connected:
            problems.append(f"{label}: required input {spec.name} is not connected")
    outputs = [item["type"] for item in node.get("outputs") or []]
    if outputs != list(definition.outputs):
        problems.append(f"{label}: outputs {outputs}, defined as {list(definition.outputs)}")
    return problems


def _source(workflow_nodes: dict[int, dict], links: dict[int, list], link_id: int) -> tuple[int, int] | None:
    """The server-side node and output a link comes from: through reroutes and bypassed nodes;
    None if it comes from a muted node."""
    _, origin_id, origin_slot, *_ = links[link_id]
    origin = workflow_nodes[origin_id]
    if origin["type"] == REROUTE:
        upstream = origin["inputs"][0].get("link")
        return None if upstream is None else _source(workflow_nodes, links, upstream)
    if origin.get("mode", MODE_ALWAYS) == MODE_MUTED:
        return None
    if origin.get("mode", MODE_ALWAYS) == MODE_BYPASS:
        return _bypass_source(workflow_nodes, links, origin, origin_slot)
    return origin_id, origin_slot


def _bypass_source(workflow_nodes, links, node: dict, slot: int) -> tuple[int, int] | None:
    """A bypassed node passes on the input of its output's type (same slot number first)."""
    kind = node["outputs"][slot]["type"]
    inputs = node.get("inputs") or []
    candidates = ([inputs[slot]] if slot < len(inputs) else []) + inputs
    for item in candidates:
        if item["type"] == kind and item.get("link") is not None:
            return _source(workflow_nodes, links, item["link"])
    return None


def ui_to_api(workflow: dict, definitions: dict[str, NodeDef]) -> dict[str, dict]:
    """The API prompt the frontend queues for this graph.

    Notes and reroutes are left out (links are followed through reroutes), muted nodes are
    dropped with their links, bypassed nodes are dropped and their consumers fed from the
    bypassed node's input of the same type. Widget values become named inputs (control-after-
    generate and upload entries are UI state and are dropped); a linked input replaces its widget.
    """
    workflow_nodes, links = nodes_by_id(workflow), links_by_id(workflow)
    prompt = {}
    for node in sorted(workflow["nodes"], key=lambda n: n["id"]):
        if node["type"] in FRONTEND_ONLY or node.get("mode", MODE_ALWAYS) in (MODE_MUTED, MODE_BYPASS):
            continue
        definition = definitions.get(node["type"])
        if definition is None:
            raise WorkflowError(f"node {node['id']}: no definition for {node['type']}")
        inputs: dict[str, Any] = dict(widget_values(node, definition))
        for item in node.get("inputs") or []:
            if item.get("link") is None:
                continue
            source = _source(workflow_nodes, links, item["link"])
            if source is None:
                inputs.pop(item["name"], None)
            else:
                inputs[item["name"]] = [str(source[0]), source[1]]
        ordered = {spec.name: inputs[spec.name] for spec in definition.inputs if spec.name in inputs}
        prompt[str(node["id"])] = {"inputs": ordered, "class_type": node["type"],
                                   "_meta": {"title": node.get("title") or definition.display_name}}
    return prompt


def dump_json(data: Any) -> str:
    """JSON as the committed files are written (stable, readable diffs)."""
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
