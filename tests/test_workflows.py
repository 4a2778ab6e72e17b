"""The example workflows in ``workflows/``, checked without ComfyUI: every file is a UI graph
that fits the node definitions (the committed ``/object_info`` snapshot, itself checked
against this pack's source here and against a live ComfyUI in the integration tests), its API
twin is its conversion, and it carries what users need (model downloads, notes, stages,
thumbnail)."""

from __future__ import annotations

import ast
import importlib.util
import itertools
import json
import re
from pathlib import Path

import pytest

import workflow_graph as wg
import workflow_layout as wl

WORKFLOWS = wg.workflow_paths()
_spec = importlib.util.spec_from_file_location("workflow_layout_script", wg.REPO_ROOT / "scripts" / "workflow_layout.py")
LAYOUT = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(LAYOUT)
DEFINITIONS = wg.load_definitions()
NODES_DIR = wg.REPO_ROOT / "nodes"

# What the issue asks for; the file names are the titles ComfyUI's template browser shows (it
# shows the name as the title and, with - and _ as spaces, as the description).
EXPECTED = {"FLUX at 2K with CLEAR", "FLUX at 8K with CLEAR and Inf-DiT", "SDXL at 4K with GSPN and Inf-DiT", "Upscale any image to 4K and 16K with Inf-DiT", "Train GSPN weights for your SDXL model"}
# Model files that no URL serves: the distillation workflow writes this one.
MADE_BY_WORKFLOWS = {"gspn_sdxl.safetensors"}
# Published where ComfyUI's frontend does not download from: the notes carry the link instead.
MANUAL_DOWNLOADS = {"mp_rank_00_model_states.pt": "https://cloud.tsinghua.edu.cn/f/6e313f7e1236468e973b/?dl=1"}
# The frontend's missing-models dialog (MissingModelsWarning in comfyui-frontend-package 1.27)
# downloads only from these hosts and only files with these suffixes; it shows anything else as
# "Download not allowed".
ALLOWED_SOURCES = ("https://civitai.com/", "https://huggingface.co/")
ALLOWED_SUFFIXES = (".safetensors", ".sft")
MODEL_DIRECTORIES = {"diffusion_models", "text_encoders", "vae", "checkpoints", "clear", "gspn", "infdit"}
JPEG_MAGIC = b"\xff\xd8\xff"


def by_name(paths):
    return pytest.mark.parametrize("path", paths, ids=[p.stem for p in paths])


@pytest.fixture(scope="module")
def loaded() -> dict[Path, dict]:
    return {path: wg.load_workflow(path) for path in WORKFLOWS}


def test_every_workflow_the_issue_names_is_shipped():
    assert {path.stem for path in WORKFLOWS} == EXPECTED


@by_name(WORKFLOWS)
def test_the_template_name_reads_as_a_title(path):
    # No file-name words ("sdxl gspn infdit 4k"): a capital first, spaces, no underscores.
    assert path.stem[0].isupper() and " " in path.stem and "_" not in path.stem and len(path.stem) <= 60


@by_name(WORKFLOWS)
def test_the_file_is_a_version_0_4_ui_graph_with_unique_ids(path, loaded):
    workflow = loaded[path]
    assert workflow["version"] == 0.4
    node_ids = [node["id"] for node in workflow["nodes"]]
    link_ids = [link[0] for link in workflow["links"]]
    assert len(set(node_ids)) == len(node_ids) and len(set(link_ids)) == len(link_ids)
    assert workflow["last_node_id"] >= max(node_ids)
    assert workflow["last_link_id"] >= max(link_ids)
    for node in workflow["nodes"]:
        assert {"id", "type", "pos", "size", "mode", "order", "properties"} <= set(node), node["id"]
        assert node["mode"] == wg.MODE_ALWAYS, f"node {node['id']} is muted or bypassed"
    assert sorted(node["order"] for node in workflow["nodes"]) == list(range(len(node_ids)))


@by_name(WORKFLOWS)
def test_every_node_type_is_a_known_comfyui_or_pack_node(path, loaded):
    unknown = {node["type"] for node in loaded[path]["nodes"]} - set(DEFINITIONS) - wg.FRONTEND_ONLY
    assert not unknown


@by_name(WORKFLOWS)
def test_links_match_their_slots_and_the_node_definitions(path, loaded):
    assert wg.check_links(loaded[path], DEFINITIONS) == []


@by_name(WORKFLOWS)
def test_widget_values_are_valid_for_their_inputs(path, loaded):
    assert wg.check_widgets(loaded[path], DEFINITIONS) == []


@by_name(WORKFLOWS)
def test_the_api_twin_is_the_conversion_of_the_ui_file(path, loaded):
    twin = wg.twin_path(path)
    assert twin.is_file(), f"run `python scripts/workflow_snapshots.py twins` to write {twin.name}"
    assert json.loads(twin.read_text()) == wg.ui_to_api(loaded[path], DEFINITIONS), (
        f"{twin.name} is stale: run `python scripts/workflow_snapshots.py twins`")


def test_there_is_no_api_twin_without_a_ui_workflow():
    twins = {path.name for path in wg.TWIN_DIR.glob("*" + wg.API_SUFFIX)}
    assert twins == {wg.twin_path(path).name for path in WORKFLOWS}


def _model_files(node: dict) -> list[str]:
    """File names a node loads from a model folder (not the input folder's images)."""
    definition = DEFINITIONS[node["type"]]
    named = wg.widget_values(node, definition)
    return [named[item.name] for item in definition.widgets
            if item.is_file_list and not item.has_upload and named[item.name] not in item.fixed_choices]


@by_name(WORKFLOWS)
def test_every_model_file_comes_with_a_download_the_frontend_allows_or_a_link_in_the_notes(path, loaded):
    notes = _notes(loaded[path])
    for node in loaded[path]["nodes"]:
        if node["type"] in wg.FRONTEND_ONLY:
            continue
        entries = {entry["name"]: entry for entry in (node["properties"].get("models") or [])}
        for name in _model_files(node):
            if name in MADE_BY_WORKFLOWS:
                assert name not in entries
                continue
            if name in MANUAL_DOWNLOADS:
                assert name not in entries, f"the frontend would show 'Download not allowed' for {name}"
                assert f"]({MANUAL_DOWNLOADS[name]})" in notes, f"no note links {name}"
                continue
            assert name in entries, f"node {node['id']} ({node['type']}) loads {name} without properties.models"
            entry = entries[name]
            assert entry["directory"] in MODEL_DIRECTORIES
            assert entry["url"].startswith(ALLOWED_SOURCES) and name.endswith(ALLOWED_SUFFIXES), entry
            if "huggingface.co" in entry["url"]:
                assert entry["url"].endswith("/" + name), entry["url"]


def _notes(workflow: dict) -> str:
    return " ".join(node["widgets_values"][0] for node in workflow["nodes"] if node["type"] in wg.NOTE_TYPES)


@by_name(WORKFLOWS)
def test_the_notes_say_where_each_model_file_goes(path, loaded):
    workflow = loaded[path]
    notes = _notes(workflow)
    for node in workflow["nodes"]:
        if node["type"] not in wg.FRONTEND_ONLY:
            for name in _model_files(node):
                assert name in notes, f"no note names {name}"
    assert "models/" in notes and re.search(r"\bGB\b", notes), "the notes give no folders or memory figures"


def _inside(node: dict, group: dict) -> bool:
    x, y, w, h = group["bounding"]
    (nx, ny), (nw, nh) = node["pos"], node["size"]
    return x <= nx and y <= ny and nx + nw <= x + w and ny + nh <= y + h


@by_name(WORKFLOWS)
def test_every_node_sits_in_a_titled_stage(path, loaded):
    workflow = loaded[path]
    groups = workflow["groups"]
    assert len(groups) >= 2 and all(group["title"].strip() for group in groups)
    for node in workflow["nodes"]:
        if node["type"] not in wg.NOTE_TYPES:
            assert any(_inside(node, group) for group in groups), f"node {node['id']} is in no group"


# LiteGraph draws a group's title inside its top edge (a node's above its position: wl.node_box).
GROUP_TITLE_HEIGHT = 40


def _overlap(a: tuple, b: tuple) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@by_name(WORKFLOWS)
def test_no_node_covers_another_node_or_a_stage_title(path, loaded):
    workflow = loaded[path]
    boxes = {node["id"]: wl.node_box(node) for node in workflow["nodes"]}
    for first, second in itertools.combinations(boxes, 2):
        assert not _overlap(boxes[first], boxes[second]), f"nodes {first} and {second} overlap"
    for group in workflow["groups"]:
        x, y, width, _ = group["bounding"]
        title = (x, y, x + width, y + GROUP_TITLE_HEIGHT)
        for node_id, box in boxes.items():
            assert not _overlap(box, title), f"node {node_id} covers the title of {group['title']!r}"


JARGON = ("neighbour keys", "-block batches", "RoPE", "theta", "proxy_ratio", "vram_budget_gb", "offload_cache",
          "save_every", "ntk_factor", "proportional_attention")


@by_name(WORKFLOWS)
def test_the_notes_speak_of_what_the_artist_sees(path, loaded):
    # The inputs by the names the nodes show, the method in plain words.
    notes = _notes(loaded[path])
    assert not [word for word in JARGON if word in notes]


@by_name(WORKFLOWS)
def test_each_plain_node_is_as_tall_as_its_widgets_and_wide_enough_for_their_labels_and_values(path, loaded):
    checked = 0
    for node in loaded[path]["nodes"]:
        definition = DEFINITIONS.get(node["type"])
        if wl.is_self_sized(node, definition):
            continue
        width, height = wl.fitted_size(node, definition)
        assert node["size"][1] == height, f"node {node['id']} ({node['type']}): {node['size'][1]} px tall, not {height}"
        assert node["size"][0] >= width, f"node {node['id']} ({node['type']}) cuts its widgets short"
        checked += 1
    assert checked >= 3


def test_a_node_gets_a_row_per_socket_and_one_per_widget():
    # LiteGraph's computeSize: max(sockets, outputs) x 20 + widgets x (20 + 4) + 8 + 6.
    definition = DEFINITIONS["VAELoader"]
    node = {"id": 1, "type": "VAELoader", "inputs": [], "outputs": [{"name": "VAE"}], "widgets_values": ["ae.sft"]}
    assert wl.fitted_size(node, definition)[1] == 20 + 24 + 8 + 6
    node["inputs"] = [{"name": "vae_name", "widget": {"name": "vae_name"}, "link": None}]  # a widget, no new row
    assert wl.fitted_size(node, definition)[1] == 58
    node["widgets_values"] = ["a_very_long_file_name_of_a_vae_" * 3 + ".safetensors"]
    assert wl.fitted_size(node, definition)[0] > 700


@by_name(WORKFLOWS)
def test_the_layout_is_the_one_the_layout_script_makes(path, loaded):
    assert LAYOUT.laid_out(loaded[path], DEFINITIONS) == loaded[path], "run scripts/workflow_layout.py"


@by_name(WORKFLOWS)
def test_the_starting_view_shows_the_whole_graph_at_a_readable_zoom(path, loaded):
    view = loaded[path]["extra"]["ds"]
    left, top, right, bottom = wl.on_screen(loaded[path], view)
    assert 0 <= left and 0 <= top and right <= wl.VIEWPORT[0] and bottom <= wl.VIEWPORT[1], (left, top, right, bottom)
    assert wl.READABLE_SCALE <= view["scale"] <= 1.0
    # and it is not lost in a corner: the graph fills the screen's width or its height
    assert max((right - left) / wl.VIEWPORT[0], (bottom - top) / wl.VIEWPORT[1]) > 0.9 or view["scale"] == 1.0


@by_name(WORKFLOWS)
def test_each_workflow_has_a_jpeg_thumbnail_beside_it(path):
    thumbnail = path.with_suffix(".jpg")
    assert thumbnail.is_file()
    assert thumbnail.read_bytes()[:3] == JPEG_MAGIC


NUMERIC_OPTIONS = ("default", "min", "max")


def _literal_options(item: ast.Call) -> dict:
    """The widget options an input states as literals (defaults, bounds), e.g. ``default=0``."""
    options = {}
    for keyword in item.keywords:
        if keyword.arg in NUMERIC_OPTIONS:
            try:
                options[keyword.arg] = ast.literal_eval(keyword.value)
            except ValueError:
                pass
    return options


def _schemas_in_source() -> dict[str, tuple[list[str], list[str], int, dict[str, dict]]]:
    """``node_id -> (required inputs, optional inputs, output count, literal widget options)``
    read from ``nodes/``."""
    schemas = {}
    for path in sorted(NODES_DIR.rglob("*.py")):
        for call in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(call, ast.Call) and getattr(call.func, "attr", None) == "Schema"):
                continue
            keywords = {keyword.arg: keyword.value for keyword in call.keywords}
            required, optional, options = [], [], {}
            for item in keywords["inputs"].elts:
                optional_kw = any(k.arg == "optional" and getattr(k.value, "value", False) for k in item.keywords)
                (optional if optional_kw else required).append(item.args[0].value)
                options[item.args[0].value] = _literal_options(item)
            outputs = keywords.get("outputs")
            schemas[keywords["node_id"].value] = (required, optional, len(outputs.elts) if outputs else 0, options)
    return schemas


def test_the_input_labels_the_nodes_declare_are_shipped_where_the_frontend_reads_them():
    shipped = json.loads(wg.LABELS_PATH.read_text())
    assert shipped == wg.node_labels(DEFINITIONS), "run scripts/workflow_snapshots.py labels"
    assert shipped["UltraResClearPatch"]["inputs"]["ntk_factor"] == {"name": "position stretch (NTK)"}


def test_the_snapshot_of_pack_nodes_matches_their_source():
    source = _schemas_in_source()
    snapshot = {name: d for name, d in DEFINITIONS.items() if name.startswith("UltraRes")}
    assert set(snapshot) == set(source), "refresh tests/workflows/node_definitions.json"
    for name, (required, optional, outputs, options) in source.items():
        raw = snapshot[name].raw
        order = raw["input_order"]
        assert (order.get("required", []), order.get("optional", []), len(snapshot[name].outputs)) == (
            required, optional, outputs), f"{name}: refresh tests/workflows/node_definitions.json"
        specs = {**raw["input"].get("required", {}), **raw["input"].get("optional", {})}
        for input_name, stated in options.items():
            shown = specs[input_name][1] if len(specs[input_name]) > 1 else {}
            assert {k: shown.get(k) for k in stated} == stated, (
                f"{name}.{input_name}: refresh tests/workflows/node_definitions.json")
