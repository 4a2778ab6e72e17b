"""The example workflows in a real ComfyUI: a headless server on the CPU lists every node type
they use with the snapshot's interface, serves them as the pack's templates, and runs each API
twin to success through ``/prompt`` and ``/history`` on stand-in models
(``tests/workflow_standins.py`` says exactly what is substituted and why)."""

from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.parse
import uuid
from pathlib import Path

import pytest
from PIL import Image

import comfy_harness
import workflow_graph as wg
import workflow_standins as ws

PACK = "ultrares"
STANDIN_PACK = "ultrares_standins"
RUN_TIMEOUT = 900.0
S = ws.SIZE_DIVISOR

# SaveImage title -> (width, height) of what the stand-in run saves: the workflows' own sizes / 16.
OUTPUTS = {
    "Train GSPN weights for your SDXL model": {"Loss curve": (640, 360 + 2 * 16),  # drawn at a fixed size, two lines of notes
                          "Sample with GSPN": (1024 // S, 1024 // S)},
    "FLUX at 2K with CLEAR": {"Save 2048×2048": (2048 // S, 2048 // S)},
    "FLUX at 8K with CLEAR and Inf-DiT": {"Save 2048×2048": (2048 // S, 2048 // S), "Save 8192×8192": (8192 // S, 8192 // S)},
    "SDXL at 4K with GSPN and Inf-DiT": {"Save 1024×1024": (1024 // S, 1024 // S), "Save 4096×4096": (4096 // S, 4096 // S)},
    "Upscale any image to 4K and 16K with Inf-DiT": {"Save 4× (4096 from 1024)": (4096 // S, 4096 // S),
                           "Save 16× (16384 from 1024)": (16384 // S, 16384 // S)},
}
# The 4K workflow loads the GSPN weights the distillation workflow writes.
NEEDS = {"SDXL at 4K with GSPN and Inf-DiT": "Train GSPN weights for your SDXL model"}
GSPN_FILE = "gspn_sdxl.safetensors"
CLEAR_DENSE_LOG = "covers the whole"  # what the CLEAR node logs when its window spans the grid
INPUT_IMAGE = ("example.png", (1024 // S, 1024 // S))


@pytest.fixture(scope="module")
def model_dirs(comfy_nodes, tmp_path_factory) -> dict[str, Path]:
    """Model folders (by ComfyUI folder name) holding the stand-in files under their real names."""
    root = tmp_path_factory.mktemp("standin_models")
    dirs = {name: root / name for name in ("diffusion_models", "vae", "checkpoints", "clear", "infdit", "gspn")}
    for folder in dirs.values():
        folder.mkdir()
    ws.write_flux_unet(dirs["diffusion_models"] / "flux1-dev.safetensors")
    ws.write_flux_vae(dirs["vae"] / "ae.safetensors")
    ws.write_sdxl_checkpoint(dirs["checkpoints"] / "sd_xl_base_1.0.safetensors")
    ws.write_clear_weights(dirs["clear"] / "clear_local_8_down_4.safetensors", down_factor=4)
    ws.write_infdit_release(dirs["infdit"] / "mp_rank_00_model_states.pt")
    return dirs


@pytest.fixture(scope="module")
def server(comfyui_path, model_dirs, tmp_path_factory):
    work = tmp_path_factory.mktemp("workflow_server")
    instance = comfy_harness.ComfyServer(comfyui_path, work, pack_name=PACK,
                                         extra_yaml={name: str(path) for name, path in model_dirs.items()},
                                         extra_packs={STANDIN_PACK: ws.STANDIN_PACK})
    (work / "input").mkdir()
    name, size = INPUT_IMAGE
    Image.new("RGB", size, (90, 140, 200)).save(work / "input" / name)
    instance.start()
    yield instance
    instance.stop()


class Runs:
    """Each workflow run once per module (the 4K workflow needs the distilled GSPN file)."""

    def __init__(self, server: comfy_harness.ComfyServer):
        self.server = server
        self.results: dict[str, tuple[dict, dict, float]] = {}

    def __call__(self, name: str) -> tuple[dict, dict, float]:
        if name in NEEDS:
            self(NEEDS[name])
        if name not in self.results:
            self.results[name] = self._run(name)
        return self.results[name]

    def _run(self, name: str) -> tuple[dict, dict, float]:
        ui = wg.load_workflow(wg.WORKFLOW_DIR / f"{name}.json")
        prompt = ws.standin_prompt(json.loads(wg.twin_path(wg.WORKFLOW_DIR / f"{name}.json").read_text()))
        self.server.post_bytes("/free", {"unload_models": True, "free_memory": True})
        start = time.monotonic()
        try:
            queued = self.server.post("/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4()),
                                                  "extra_data": {"extra_pnginfo": {"workflow": ui}}})
        except urllib.error.HTTPError as error:
            pytest.fail(f"{name} was refused: {error.read().decode()}")
        history = self._wait(queued["prompt_id"])
        elapsed = time.monotonic() - start
        print(f"{name}: {elapsed:.1f} s on stand-ins")
        status = history["status"]
        assert status["status_str"] == "success", (
            f"{name}: {json.dumps(status['messages'])[-3000:]}\n{self.server.log()[-3000:]}")
        return prompt, history, elapsed

    def _wait(self, prompt_id: str) -> dict:
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            entry = self.server.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry["status"].get("completed") is not None and entry["status"]["status_str"]:
                return entry
            time.sleep(0.5)
        pytest.fail(f"prompt {prompt_id} did not finish within {RUN_TIMEOUT:.0f} s:\n{self.server.log()[-3000:]}")


@pytest.fixture(scope="module")
def runs(server) -> Runs:
    return Runs(server)


def saved_sizes(server: comfy_harness.ComfyServer, prompt: dict, history: dict) -> dict[str, tuple[int, int]]:
    """Size of the image each SaveImage node wrote, by node title."""
    sizes = {}
    for node_id, node in prompt.items():
        if node["class_type"] != "SaveImage":
            continue
        (image,) = history["outputs"][node_id]["images"]
        query = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image["subfolder"],
                                        "type": image["type"]})
        sizes[node["_meta"]["title"]] = Image.open(io.BytesIO(server.get_bytes(f"/view?{query}"))).size
    return sizes


def test_comfyui_lists_every_node_type_with_the_snapshots_interface(server):
    # The snapshot's own ComfyUI must serve it exactly; any other version must still serve
    # everything the workflows rely on (new optional inputs, defaults and choices are fine).
    live = server.get("/object_info")
    same_version = server.get("/system_stats")["system"]["comfyui_version"] == wg.snapshot_version()
    differences = wg.interface_differences if same_version else wg.compatibility_differences
    for name, definition in wg.load_definitions().items():
        assert name in live, f"ComfyUI does not list {name}"
        assert differences(definition.raw, wg.snapshot_entry(live[name])) == [], name


def test_the_workflows_are_served_as_the_packs_templates(server):
    names = {path.stem for path in wg.workflow_paths()}
    assert set(server.get("/workflow_templates")[PACK]) == names
    for name in names:
        for suffix in (".json", ".jpg"):
            served = server.get_bytes(f"/api/workflow_templates/{PACK}/{urllib.parse.quote(name + suffix)}")
            assert served == (wg.WORKFLOW_DIR / (name + suffix)).read_bytes()


def test_the_frontend_gets_the_pack_nodes_input_labels_through_i18n(server):
    # The frontend labels widgets with nodeDefs.<node>.inputs.<input>.name, else with the id.
    served = server.get("/i18n")["en"]["nodeDefs"]
    assert {name: served[name] for name in json.loads(wg.LABELS_PATH.read_text())} == json.loads(
        wg.LABELS_PATH.read_text())


def test_the_stand_in_prompt_keeps_every_pack_node_and_link_as_shipped():
    for path in wg.workflow_paths():
        shipped = json.loads(wg.twin_path(path).read_text())
        standin = ws.standin_prompt(shipped)
        for node_id, node in shipped.items():
            if node["class_type"].startswith("UltraRes"):
                expected = {k: v for k, v in node["inputs"].items()
                            if k not in ws.SIZE_INPUTS + ws.STEP_INPUTS}
                assert {k: v for k, v in standin[node_id]["inputs"].items() if k in expected} == expected


def test_gspn_distillation_writes_the_weights_file_and_saves_its_outputs(runs, server, model_dirs):
    prompt, history, _ = runs("Train GSPN weights for your SDXL model")
    assert (model_dirs["gspn"] / GSPN_FILE).is_file()
    assert saved_sizes(server, prompt, history) == OUTPUTS["Train GSPN weights for your SDXL model"]


@pytest.mark.parametrize("name", [name for name in OUTPUTS if name != "Train GSPN weights for your SDXL model"])
def test_the_workflow_runs_to_success_and_saves_images_of_its_scaled_size(runs, server, name):
    prompt, history, _ = runs(name)
    assert saved_sizes(server, prompt, history) == OUTPUTS[name]


def test_the_clear_stage_ran_windowed_attention_not_a_dense_fallback(runs, server):
    runs("FLUX at 2K with CLEAR")
    assert CLEAR_DENSE_LOG not in server.log()


def test_every_workflow_has_an_end_to_end_case():
    assert set(OUTPUTS) == {path.stem for path in wg.workflow_paths()}
