"""The GSPN weight file: what it stores, and the loader refusing files made for another model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from broken_files import CASES, break_file
from gspn_standin import TinyUNet
from ultrares.models.gspn import (GSPNConfig, GSPNLayers, GSPNWeightsError, TrainingRecord, find_attn1_layers,
                                  load_gspn_weights, save_gspn_weights)
from ultrares.models.gspn.optimizer_state import (load_optimizer_state, make_optimizer, optimizer_path,
                                                  save_optimizer_state)


@pytest.fixture
def specs():
    return find_attn1_layers(TinyUNet())


@pytest.fixture
def saved(specs, tmp_path):
    torch.manual_seed(0)
    layers = GSPNLayers(specs, GSPNConfig(chunk=3, proxy_ratio=4))
    path = tmp_path / "gspn_tiny.safetensors"
    save_gspn_weights(path, layers, "TinyStandIn", TrainingRecord(steps=7, layer_losses=[0.5, 0.25]))
    return path, layers


def test_saved_file_loads_back_to_the_same_modules_config_and_record(saved, specs):
    path, layers = saved
    loaded, record = load_gspn_weights(path, "TinyStandIn", specs)
    assert loaded.config == GSPNConfig(chunk=3, proxy_ratio=4) and loaded.specs == specs
    assert record.steps == 7 and record.layer_losses == [0.5, 0.25]
    for key, value in layers.named_state().items():
        torch.testing.assert_close(loaded.named_state()[key], value, rtol=0, atol=0)


def test_file_names_tensors_by_layer_path_and_carries_family_layers_and_config(saved):
    path, _ = saved
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert "input_blocks.1.1.transformer_blocks.0.attn1.to_proxy.weight" in keys
    assert meta["base_model"] == "TinyStandIn"
    assert json.loads(meta["config"]) == {"chunk": 3, "proxy_ratio": 4}
    assert json.loads(meta["layers"])[1] == {"name": "middle_block.1.transformer_blocks.0.attn1",
                                             "block": ["middle", 0, 0], "dim": 32, "level": 1}


def test_file_made_for_another_model_family_is_refused_naming_both(saved):
    path, _ = saved
    with pytest.raises(GSPNWeightsError, match="distilled for a TinyStandIn model, but this model is SDXL"):
        load_gspn_weights(path, "SDXL")


def test_file_for_other_layers_is_refused_naming_the_first_differences(saved, specs):
    path, _ = saved
    other = [s for s in specs if s.block[0] != "middle"] + [
        type(specs[0])(name="middle_block.1.transformer_blocks.1.attn1", block=("middle", 0, 1), dim=32, level=1)]
    wider = [type(s)(s.name, s.block, 64, s.level) if s.block == ("input", 1, 0) else s for s in specs]
    with pytest.raises(GSPNWeightsError, match=r"missing GSPN layers: middle_block\.1\.transformer_blocks\.1"):
        load_gspn_weights(path, "TinyStandIn", other)
    with pytest.raises(GSPNWeightsError, match=r"another width: input_blocks\.1\.1\.transformer_blocks\.0\.attn1 "
                                               r"\(file width 16, model width 64\)"):
        load_gspn_weights(path, "TinyStandIn", wider)


def test_damaged_file_is_refused_naming_missing_keys(saved, tmp_path):
    path, layers = saved
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys() if not k.endswith("merge")}
    damaged = tmp_path / "damaged.safetensors"
    save_file(state, str(damaged), metadata=meta)
    with pytest.raises(GSPNWeightsError, match=r"does not fit the layers its own metadata lists .*: missing GSPN keys: input_blocks\.1\.1\.transformer_blocks\.0\.attn1\.merge"):
        load_gspn_weights(damaged)


def test_safetensors_that_are_not_gspn_weights_are_refused(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_up.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(GSPNWeightsError, match=r"^lora\.safetensors is a LoRA, not GSPN weights made by this pack: load "
                                               r"it with a LoRA loader \(models/loras\)\. GSPN weights are made by the "
                                               r"GSPN Distill node"):
        load_gspn_weights(path)


def test_a_file_that_is_no_safetensors_at_all_is_refused_by_name(tmp_path):
    path = tmp_path / "old_model.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(GSPNWeightsError, match=r"^old_model\.pt is a PyTorch checkpoint \(torch\.save\), not GSPN weights "
                                               r"made by this pack \(read from safetensors files only\)"):
        load_gspn_weights(path)


@pytest.mark.parametrize("case", list(CASES))
def test_a_broken_file_is_refused_naming_it_and_how_to_make_a_good_one(saved, case):
    path, _ = saved
    with pytest.raises(GSPNWeightsError, match=rf"^gspn_tiny\.safetensors {CASES[case]}.*GSPN Distill node"):
        load_gspn_weights(break_file(path, case))


@pytest.mark.parametrize("case", list(CASES))
def test_a_broken_optimizer_state_is_refused_saying_it_can_be_deleted(saved, case):
    path, layers = saved
    optimizer = make_optimizer(layers, 1e-3)
    save_optimizer_state(optimizer_path(path), layers, optimizer, steps=7)
    with pytest.raises(GSPNWeightsError, match=rf"^gspn_tiny\.safetensors\.optimizer {CASES[case]}.*Delete it to resume "
                                               r"with a fresh optimizer"):
        load_optimizer_state(break_file(optimizer_path(path), case), layers, optimizer, steps=7)


def test_saving_replaces_the_file_in_one_step(saved):
    path, layers = saved
    save_gspn_weights(path, layers, "TinyStandIn", TrainingRecord(steps=8))
    assert load_gspn_weights(path)[1].steps == 8
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
