"""Broken weight files through every loader node of a real ComfyUI (in-process, CPU).

Each prompt is validated and run by ComfyUI's own ``validate_prompt`` and ``PromptExecutor``,
and the ``execution_error`` it sends is what the frontend's error dialog shows: the message must
name the file, say what is wrong (empty, incomplete, not safetensors, another kind of model,
keys that do not fit) and what to do, and the exception type must read as a short name, not
the pack's folder path (ComfyUI shows ``module.qualname`` unless the module is ``builtins``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import comfy_harness
from broken_files import CASES, PICKLE_CASES, break_file
from infdit_release import released_state_dict, save_released_layout
from ultrares.models.gspn import GSPNConfig, GSPNLayers, TrainingRecord, find_attn1_layers, save_gspn_weights
from ultrares.models.gspn.optimizer_state import make_optimizer, optimizer_path, save_optimizer_state
from ultrares.models.infdit.tiny import tiny_weights

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

FLUX = comfy_harness.TINY_FLUX_CONFIG


@pytest.fixture
def model_dir(pack_nodes, tmp_path, monkeypatch):
    """``models/<name>`` folders of this test only (and the pack's nodes registered, as ComfyUI's loader does)."""
    import folder_paths
    import nodes

    nodes.NODE_CLASS_MAPPINGS.update(pack_nodes)

    def folder(name: str) -> Path:
        path = tmp_path / name
        path.mkdir(exist_ok=True)
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name,
                            ([str(path)], set(folder_paths.supported_pt_extensions)))
        monkeypatch.delitem(folder_paths.filename_list_cache, name, raising=False)
        return path

    return folder


@dataclass
class Loader:
    """A loader node, a prompt that runs it on one file, and what its errors say."""

    node: str
    error_type: str
    remedy: str

    def prompt(self, inputs: dict, model: object = None) -> tuple[dict, dict]:
        from comfy_api.latest import io

        prompt = {"2": {"class_type": self.node, "inputs": dict(inputs)},
                  "3": {"class_type": "UltraResTestSink", "inputs": {"value": ["2", 0]}}}
        test_nodes = {"UltraResTestSink": comfy_harness.sink_node("UltraResTestSink")}
        if model is not None:
            prompt["1"] = {"class_type": "UltraResTestModel", "inputs": {}}
            prompt["2"]["inputs"]["model"] = ["1", 0]
            test_nodes["UltraResTestModel"] = comfy_harness.source_node("UltraResTestModel", io.Model, model)
        return prompt, test_nodes

    def refuses(self, prompt_and_nodes: tuple[dict, dict], message: str) -> None:
        executor, server = comfy_harness.execute_prompt(*prompt_and_nodes)
        assert not executor.success and "execution_error" in server.events()
        error = server.execution_error()
        assert error["node_type"] == self.node
        assert error["exception_type"] == self.error_type
        assert re.search(message, error["exception_message"]), error["exception_message"]
        assert self.remedy in error["exception_message"]


CLEAR = Loader("UltraResClearPatch", "ClearWeightsError", "Huage001/CLEAR")
GSPN_PATCH = Loader("UltraResGSPNPatch", "GSPNWeightsError", "GSPN Distill node")
GSPN_DISTILL = Loader("UltraResGSPNDistill", "GSPNWeightsError", "Delete it to resume with a fresh optimizer")
INFDIT = Loader("UltraResInfDiTLoader", "InfDiTCheckpointError", "THUDM/Inf-DiT README")
CLIP = Loader("UltraResInfDiTLoader", "InfDiTCheckpointError", "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K")


def clear_inputs(name: str) -> dict:
    return dict(clear_weights=name, window_radius=0, down_factor=0, ntk_factor=1.0, proportional_attention=False,
                min_image_tokens=0, backend="auto")


@pytest.fixture(scope="module")
def flux(pack_nodes):
    return comfy_harness.tiny_flux_patcher()


@pytest.mark.parametrize("case", [*CASES, "another-flux"])
def test_the_clear_node_names_a_broken_file(model_dir, flux, case):
    depth = FLUX["depth"] + (case == "another-flux")
    path = model_dir("clear") / "clear_local_8.safetensors"
    save_file(comfy_harness.clear_released_state_dict(depth, FLUX["depth_single_blocks"], FLUX["hidden_size"]), str(path))
    message = r"does not fit this Flux \(2 double \+ 2 single blocks\): unexpected CLEAR keys: transformer_blocks\.2\."
    if case in CASES:
        break_file(path, case)
        message = CASES[case]
    CLEAR.refuses(CLEAR.prompt(clear_inputs(path.name), flux), rf"^clear_local_8\.safetensors {message}")


@pytest.fixture(scope="module")
def sd15(pack_nodes):
    return comfy_harness.tiny_sd15_patcher()


def gspn_file(folder: Path, sd15, layers_of=None) -> tuple[Path, GSPNLayers]:
    specs = find_attn1_layers(sd15.get_model_object("diffusion_model"))
    layers = GSPNLayers(specs if layers_of is None else layers_of(specs), GSPNConfig(chunk=4, proxy_ratio=4))
    path = folder / "gspn_sd15.safetensors"
    save_gspn_weights(path, layers, "SD15", TrainingRecord(steps=2))
    return path, layers


@pytest.mark.parametrize("case", [*CASES, "other-layers"])
def test_the_gspn_patch_node_names_a_broken_file(model_dir, sd15, case):
    path, _ = gspn_file(model_dir("gspn"), sd15, (lambda specs: specs[1:]) if case == "other-layers" else None)
    message = r"does not fit this model's self-attention layers: missing GSPN layers: input_blocks\.1\.1\."
    if case in CASES:
        break_file(path, case)
        message = CASES[case]
    inputs = dict(gspn_weights=path.name, keep_attention_levels=0, keep_attention_layers="", min_resolution=0)
    GSPN_PATCH.refuses(GSPN_PATCH.prompt(inputs, sd15), rf"^gspn_sd15\.safetensors {message}")


@pytest.mark.parametrize("case", list(CASES))
def test_resuming_gspn_distillation_names_a_broken_optimizer_state(model_dir, sd15, case):
    path, layers = gspn_file(model_dir("gspn"), sd15)
    save_optimizer_state(optimizer_path(path), layers, make_optimizer(layers, 1e-3), steps=2)
    break_file(optimizer_path(path), case)
    inputs = dict(positive=["0", 0], output_name="gspn_sd15", steps=1, learning_rate=1e-3, width=64, height=64,
                  batch_size=1, sampling_steps=2, cfg=1.0, prediction_weight=0.0, chunk=4, proxy_ratio=4, seed=0,
                  resume=True, save_every=0)
    prompt, test_nodes = GSPN_DISTILL.prompt(inputs, sd15)
    from comfy_api.latest import io

    prompt["0"] = {"class_type": "UltraResTestConditioning", "inputs": {}}
    test_nodes["UltraResTestConditioning"] = comfy_harness.source_node(
        "UltraResTestConditioning", io.Conditioning, comfy_harness.sd15_conditioning())
    GSPN_DISTILL.refuses((prompt, test_nodes), rf"^gspn_sd15\.safetensors\.optimizer {CASES[case]}")


def infdit_inputs(checkpoint: str, clip_vision: str = "from checkpoint") -> dict:
    return dict(checkpoint=checkpoint, clip_vision=clip_vision, dtype="fp32")


@pytest.fixture(scope="module")
def released():
    return released_state_dict(tiny_weights(seed=5))


@pytest.mark.parametrize("case", [*PICKLE_CASES, "missing-key"])
def test_the_infdit_loader_names_a_broken_released_file(model_dir, released, case):
    path = model_dir("infdit") / "mp_rank_00_model_states.pt"
    state = {k: v for k, v in released.items() if k != "transformer.layers.1.attention.dense.bias"}
    save_released_layout(state if case == "missing-key" else released, path)
    message = r": missing Inf-DiT keys: transformer\.layers\.1\.attention\.dense\.bias"
    if case in PICKLE_CASES:
        break_file(path, case)
        message = " " + PICKLE_CASES[case]
    INFDIT.refuses(INFDIT.prompt(infdit_inputs(path.name)), rf"^mp_rank_00_model_states\.pt{message}")


@pytest.mark.parametrize("case", list(CASES))
def test_the_infdit_loader_names_a_broken_converted_file(model_dir, released, case):
    path = model_dir("infdit") / "infdit.safetensors"
    save_file({"blocks.0.qkv.weight": torch.zeros(2, 2)}, str(path))
    break_file(path, case)
    INFDIT.refuses(INFDIT.prompt(infdit_inputs(path.name)), rf"^infdit\.safetensors {CASES[case]}")


@pytest.mark.parametrize("case", [*CASES, "another-tower"])
def test_the_infdit_loader_names_a_broken_clip_vision_file(model_dir, released, case):
    folder = model_dir("infdit")
    save_released_layout({k: v for k, v in released.items() if not k.startswith("image_encoder.")},
                         folder / "mp_rank_00_model_states.pt")
    clip = {k.removeprefix("image_encoder.model."): v for k, v in released.items() if k.startswith("image_encoder.")}
    if case == "another-tower":
        clip["visual.ln_post.weight"] = torch.ones(3)
    path = model_dir("clip_vision") / "open_clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.items()}, str(path))
    message = r": CLIP image tower keys of another shape: ln_post\.weight \(3,\)"
    if case in CASES:
        break_file(path, case)
        message = " " + CASES[case]
    prompt = CLIP.prompt(infdit_inputs("mp_rank_00_model_states.pt", "clip_vision/open_clip.safetensors"))
    if case == "wrong-kind":
        # A file that is no CLIP tower is not offered: queueing it is refused, saying what it is.
        errors = comfy_harness.validation_errors(*prompt)["2"]["errors"]
        assert {error["extra_info"]["input_name"] for error in errors} == {"checkpoint", "clip_vision"}
        details = errors[-1]["details"]
        assert re.search(rf"'clip_vision/open_clip\.safetensors' is not in the list.*; open_clip\.safetensors"
                         rf"{message}.*{CLIP.remedy}", details), details
        return
    CLIP.refuses(prompt, rf"^open_clip\.safetensors{message}")
