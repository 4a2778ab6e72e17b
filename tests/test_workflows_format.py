"""The UI→API conversion and the graph checks behind the workflow tests, on small hand-made graphs
and node definitions in ``/object_info`` form."""

from __future__ import annotations

import copy

import pytest

import workflow_graph as wg

PROBE = f"{wg.FILE_PROBE}.safetensors"
RAW = {
    "Loader": {"name": "Loader", "display_name": "Load Model", "input": {"required": {
        "ckpt_name": [[PROBE], {}]}}, "input_order": {"required": ["ckpt_name"]},
        "output": ["MODEL"], "output_name": ["MODEL"]},
    "Sampler": {"name": "Sampler", "display_name": "Sampler", "input": {
        "required": {"model": ["MODEL", {}], "seed": ["INT", {"min": 0, "max": 100, "control_after_generate": True}],
                     "steps": ["INT", {"default": 20, "min": 1, "max": 50}],
                     "method": ["COMBO", {"options": ["euler", "heun"]}]},
        "optional": {"strength": ["FLOAT", {"min": 0.0, "max": 1.0}], "extra": ["MODEL", {}]}},
        "input_order": {"required": ["model", "seed", "steps", "method"], "optional": ["strength", "extra"]},
        "output": ["LATENT"], "output_name": ["LATENT"]},
    "Picture": {"name": "Picture", "input": {"required": {"image": [[f"{wg.FILE_PROBE}.png"], {"image_upload": True}],
                                                         "noise_seed": ["INT", {"min": 0, "max": 9}]}},
                "input_order": {"required": ["image", "noise_seed"]}, "output": ["IMAGE"], "output_name": ["IMAGE"]},
    "Patch": {"name": "Patch", "input": {"required": {"model": ["MODEL", {}], "weights": [["none", PROBE], {}]}},
              "input_order": {"required": ["model", "weights"]}, "output": ["MODEL"], "output_name": ["MODEL"]},
}
DEFS = {name: wg.node_def(raw) for name, raw in RAW.items()}


def _node(node_id, kind, widgets, inputs=(), outputs=(), mode=0, title=None):
    node = {"id": node_id, "type": kind, "pos": [0, 0], "size": [100, 100], "mode": mode, "order": node_id,
            "properties": {}, "widgets_values": list(widgets),
            "inputs": [{"name": name, "type": kind_, "link": link} for name, kind_, link in inputs],
            "outputs": [{"name": kind_, "type": kind_, "links": links} for kind_, links in outputs]}
    if title:
        node["title"] = title
    return node


def graph() -> dict:
    """Loader -> Patch -> Sampler (via a reroute), a note, and a picture."""
    return {"version": 0.4, "groups": [], "nodes": [
        _node(1, "Loader", ["model.safetensors"], outputs=[("MODEL", [1])]),
        _node(2, "Patch", ["none"], inputs=[("model", "MODEL", 1)], outputs=[("MODEL", [2])]),
        {"id": 3, "type": "Reroute", "pos": [0, 0], "size": [75, 26], "mode": 0, "order": 3, "properties": {},
         "inputs": [{"name": "", "type": "*", "link": 2}], "outputs": [{"name": "", "type": "MODEL", "links": [3]}]},
        _node(4, "Sampler", [7, "randomize", 10, "heun", 0.5], inputs=[("model", "MODEL", 3), ("extra", "MODEL", None)],
              outputs=[("LATENT", None)], title="My sampler"),
        _node(5, "MarkdownNote", ["# hello"]),
        _node(6, "Picture", ["cat.png", "image", 3, "fixed"], outputs=[("IMAGE", None)]),
    ], "links": [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "MODEL"], [3, 3, 0, 4, 0, "MODEL"]]}


def test_widget_values_become_named_inputs_without_control_and_upload_entries():
    prompt = wg.ui_to_api(graph(), DEFS)
    assert prompt["4"] == {"class_type": "Sampler", "_meta": {"title": "My sampler"}, "inputs": {
        "model": ["2", 0], "seed": 7, "steps": 10, "method": "heun", "strength": 0.5}}
    assert prompt["6"]["inputs"] == {"image": "cat.png", "noise_seed": 3}
    assert prompt["1"]["_meta"] == {"title": "Load Model"}


def test_notes_and_reroutes_are_not_sent_and_links_follow_reroutes():
    assert set(wg.ui_to_api(graph(), DEFS)) == {"1", "2", "4", "6"}


def test_a_muted_node_is_dropped_with_its_links():
    workflow = graph()
    workflow["nodes"][1]["mode"] = wg.MODE_MUTED
    prompt = wg.ui_to_api(workflow, DEFS)
    assert "2" not in prompt and "model" not in prompt["4"]["inputs"]


def test_a_bypassed_node_hands_its_input_of_the_same_type_through():
    workflow = graph()
    workflow["nodes"][1]["mode"] = wg.MODE_BYPASS
    prompt = wg.ui_to_api(workflow, DEFS)
    assert "2" not in prompt and prompt["4"]["inputs"]["model"] == ["1", 0]


def test_a_linked_widget_input_takes_the_link():
    workflow = graph()
    workflow["nodes"][3]["inputs"].append({"name": "steps", "type": "INT", "link": 4, "widget": {"name": "steps"}})
    workflow["nodes"][5]["outputs"][0] = {"name": "INT", "type": "INT", "links": [4]}
    workflow["links"].append([4, 6, 0, 4, 2, "INT"])
    assert wg.ui_to_api(workflow, DEFS)["4"]["inputs"]["steps"] == ["6", 0]


def test_the_hand_made_graph_passes_both_checks():
    assert wg.check_links(graph(), DEFS) == []
    assert wg.check_widgets(graph(), DEFS) == []


@pytest.mark.parametrize("edit, problem", [
    (lambda w: w["links"][0].__setitem__(5, "LATENT"), "type LATENT but output 0 of node 1 is MODEL"),
    (lambda w: w["nodes"][0]["outputs"][0].__setitem__("links", []), "output 0 of node 1 does not list it"),
    (lambda w: w["nodes"][1]["inputs"][0].__setitem__("link", None), "input 0 of node 2 does not name it"),
    (lambda w: w["nodes"][1]["inputs"][0].__setitem__("name", "modle"), "no input named modle"),
    (lambda w: w["links"].pop(0), "input model names missing link 1"),
    (lambda w: w["nodes"][0]["outputs"][0].__setitem__("type", "CLIP"), "outputs ['CLIP'], defined as ['MODEL']"),
])
def test_link_problems_are_named(edit, problem):
    workflow = graph()
    edit(workflow)
    assert any(problem in line for line in wg.check_links(workflow, DEFS)), wg.check_links(workflow, DEFS)


def test_an_unconnected_required_socket_is_reported():
    workflow = graph()
    workflow["nodes"][3]["inputs"][0]["link"] = None
    workflow["links"].pop(2)
    workflow["nodes"][2]["outputs"][0]["links"] = []
    assert "node 4 (Sampler): required input model is not connected" in wg.check_links(workflow, DEFS)


@pytest.mark.parametrize("node_index, values, problem", [
    (3, [7, "randomize", 51, "heun", 0.5], "steps: 51 is above the maximum 50"),
    (3, [7, "randomize", 10, "dpm", 0.5], "method: 'dpm' is not one of ['euler', 'heun']"),
    (3, [7, "randomize", 10.5, "heun", 0.5], "steps: 10.5 is not an integer"),
    (3, [7, "sometimes", 10, "heun", 0.5], "seed: control value 'sometimes'"),
    (3, [7, 10, "heun", 0.5], "4 widget values for 5 widget slots"),
    (1, [""], "weights: '' is not a file name"),
])
def test_widget_problems_are_named(node_index, values, problem):
    workflow = graph()
    workflow["nodes"][node_index]["widgets_values"] = values
    problems = wg.check_widgets(workflow, DEFS)
    assert any(problem in line for line in problems), problems


def test_file_lists_take_any_file_name_and_their_fixed_entries():
    workflow = graph()
    for value in ("none", "clear_local_8_down_4.safetensors"):
        workflow["nodes"][1]["widgets_values"] = [value]
        assert wg.check_widgets(workflow, DEFS) == []
    assert DEFS["Patch"].input("weights").fixed_choices == ("none",)


def test_a_file_list_whose_default_is_the_first_file_matches_any_install_whose_default_is_listed():
    snapshot = copy.deepcopy(RAW["Patch"])
    snapshot["input"]["required"]["weights"] = ["COMBO", {"default": PROBE, "options": [PROBE, "none"]}]
    live = copy.deepcopy(snapshot)
    live["input"]["required"]["weights"][1].update(default="clear_local_16.safetensors",
                                                    options=["clear_local_16.safetensors", "none"])
    assert wg.interface_differences(snapshot, live) == []
    live["input"]["required"]["weights"][1]["default"] = "gone.safetensors"
    assert wg.interface_differences(snapshot, live) != []


def test_the_snapshot_keeps_interface_data_only():
    raw = copy.deepcopy(RAW["Sampler"])
    raw.update(description="long text", python_module="custom_nodes.somewhere", output_tooltips=["x"])
    raw["input"]["required"]["steps"][1]["tooltip"] = "how many"
    raw["input"]["hidden"] = {"prompt": "PROMPT"}
    raw["input_order"]["hidden"] = ["prompt"]
    entry = wg.snapshot_entry(raw)
    assert set(entry) <= set(wg.DEFINITION_KEYS)
    assert "tooltip" not in entry["input"]["required"]["steps"][1]
    assert "hidden" not in entry["input"] and "hidden" not in entry["input_order"]
    assert wg.node_def(entry) == DEFS["Sampler"]


def _another_version(edit) -> dict:
    """The Sampler entry as a later ComfyUI might serve it, after ``edit(raw)``."""
    raw = copy.deepcopy(RAW["Sampler"])
    edit(raw)
    return wg.snapshot_entry(raw)


def _add_optional_widget(raw):
    raw["input"]["optional"]["shift"] = ["FLOAT", {"default": 1.0}]
    raw["input_order"]["optional"].append("shift")


def test_another_versions_additions_and_new_defaults_keep_the_snapshot_compatible():
    def later(raw):
        _add_optional_widget(raw)
        raw["input"]["required"]["steps"][1].update(default=8, max=10000)
        raw["input"]["required"]["method"][1]["options"].append("res_multistep")
        raw["output"].append("LATENT")
        raw["output_name"].append("denoised")
        raw["display_name"] = "Sampler (advanced)"

    live = _another_version(later)
    assert wg.interface_differences(RAW["Sampler"], live) != []
    assert wg.compatibility_differences(RAW["Sampler"], live) == []
    assert wg.compatibility_differences(RAW["Sampler"], wg.snapshot_entry(RAW["Sampler"])) == []


def _insert_required_widget(raw):
    raw["input"]["required"]["denoise"] = ["FLOAT", {"default": 1.0}]
    raw["input_order"]["required"].insert(1, "denoise")


def _drop_steps(raw):
    del raw["input"]["required"]["steps"]
    raw["input_order"]["required"].remove("steps")


def _optional_strength_becomes_int(raw):
    raw["input"]["optional"]["strength"] = ["INT", {}]


def _drop_choice(raw):
    raw["input"]["required"]["method"][1]["options"].remove("heun")


def _change_output(raw):
    raw["output"] = ["IMAGE"]


@pytest.mark.parametrize("edit, problem", [
    (_insert_required_widget, "new required input denoise"),
    (_drop_steps, "input steps is gone"),
    (_optional_strength_becomes_int, "input strength: FLOAT required=False is now INT"),
    (_drop_choice, "input method: choices ['heun'] are gone"),
    (_change_output, "outputs ['LATENT'] are not the first of ['IMAGE']"),
])
def test_what_another_version_breaks_is_named(edit, problem):
    problems = wg.compatibility_differences(RAW["Sampler"], _another_version(edit))
    assert any(problem in line for line in problems), problems


def test_widgets_in_another_order_break_the_positions_ui_files_store_their_values_at():
    def later(raw):
        raw["input_order"]["required"] = ["model", "steps", "seed", "method"]

    problems = wg.compatibility_differences(RAW["Sampler"], _another_version(later))
    assert problems == ["widgets ['seed', 'steps', 'method', 'strength'] are not the first of "
                        "['steps', 'seed', 'method', 'strength']"]
