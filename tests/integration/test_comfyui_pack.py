"""The pack inside a real ComfyUI (in-process, CPU): registration, model folders, node
conventions and the tiny-model fixtures every method's tests build on."""

from __future__ import annotations

import asyncio

import pytest
import torch

import comfy_harness


def test_comfyui_loader_registers_every_node_of_the_pack(comfy_nodes, pack_nodes):
    # The same call ComfyUI makes for each folder in custom_nodes/.
    assert asyncio.run(comfy_nodes.load_custom_node(str(comfy_harness.REPO_ROOT)))
    for node_id, cls in pack_nodes.items():
        assert comfy_nodes.NODE_CLASS_MAPPINGS[node_id].GET_SCHEMA().node_id == node_id


def test_model_folders_list_only_weight_files(pack_nodes, tmp_path):
    import folder_paths

    for name in ("clear", "gspn", "infdit"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / f"{name}_weights.safetensors").write_bytes(b"")
        (folder / "README.txt").write_text("not a model")
        folder_paths.add_model_folder_path(name, str(folder))
        assert folder_paths.get_filename_list(name) == [f"{name}_weights.safetensors"]


def test_extra_model_paths_yaml_entries_reach_the_pack_folders(pack_nodes, tmp_path):
    import folder_paths
    from utils.extra_config import load_extra_path_config

    big_disk = tmp_path / "big_disk" / "infdit"
    big_disk.mkdir(parents=True)
    (big_disk / "infdit_4x.safetensors").write_bytes(b"")
    yaml_path = tmp_path / "extra_model_paths.yaml"
    yaml_path.write_text(f"mine:\n  base_path: {tmp_path / 'big_disk'}\n  infdit: infdit\n")
    load_extra_path_config(str(yaml_path))
    assert "infdit_4x.safetensors" in folder_paths.get_filename_list("infdit")
    assert folder_paths.get_full_path_or_raise("infdit", "infdit_4x.safetensors") == str(
        big_disk / "infdit_4x.safetensors")


def test_nodes_follow_the_pack_conventions(pack_nodes):
    for node_id, cls in pack_nodes.items():
        schema = cls.GET_SCHEMA()
        assert node_id.startswith("UltraRes"), node_id
        assert schema.category.startswith("UltraRes/"), (node_id, schema.category)
        assert schema.description, f"{node_id} has no description"
        for item in schema.inputs:
            assert item.tooltip, f"{node_id}.{item.id} has no tooltip"


@pytest.mark.parametrize("make_model, conditioning, latent_shape", [
    (comfy_harness.tiny_flux_patcher, comfy_harness.flux_conditioning, (1, 16, 12, 20)),
    (comfy_harness.tiny_sd15_patcher, comfy_harness.sd15_conditioning, (2, 4, 16, 24)),
])
def test_tiny_models_sample_deterministically_with_comfyuis_sampler(comfy_nodes, make_model, conditioning,
                                                                   latent_shape):
    model = make_model(seed=1)
    cond = conditioning(batch=latent_shape[0])
    latent = torch.zeros(latent_shape)
    first = comfy_harness.sample(model, cond, cond, latent, seed=3)
    second = comfy_harness.sample(make_model(seed=1), cond, cond, latent, seed=3)
    assert first.shape == latent_shape
    assert torch.isfinite(first).all()
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not torch.equal(first, comfy_harness.sample(make_model(seed=2), cond, cond, latent, seed=3))


def test_the_harness_follows_newer_signatures_where_the_host_has_them(comfy_nodes, monkeypatch):
    # Stand-ins of the 0.38-line signatures the harness adapts to (named per helper in comfy_harness).
    import dataclasses

    import comfy.ldm.flux.model
    import comfy.utils
    import execution

    class PromptExecutorWithCacheArgs:  # execution.py, Comfy-Org/ComfyUI 04e2a914
        def __init__(self, server, cache_type=False, cache_args=None, asset_manager=None):
            self.ram = (cache_args["ram"], cache_args["ram_inactive"])

    monkeypatch.setattr(execution, "PromptExecutor", PromptExecutorWithCacheArgs)
    assert comfy_harness.prompt_executor(object()).ram == (0.0, 0.0)

    @dataclasses.dataclass
    class FluxParamsWithTextIds:  # FluxParams with txt_ids_dims, no default (comfy/ldm/flux/model.py)
        hidden_size: int
        txt_ids_dims: list

    monkeypatch.setattr(comfy.ldm.flux.model, "FluxParams", FluxParamsWithTextIds)
    assert comfy_harness.flux_unet_config({"hidden_size": 64}) == {"hidden_size": 64, "txt_ids_dims": []}

    for name, value in (("PROGRESS_THROTTLE_MIN_INTERVAL", 0.1), ("PROGRESS_THROTTLE_MIN_PERCENT", 0.5)):
        monkeypatch.setattr(comfy.utils, name, value, raising=False)  # comfy/utils.py, Comfy-Org/ComfyUI 09708eae
    assert comfy_harness.unthrottle_progress_bars() == list(comfy_harness.PROGRESS_THROTTLE_SETTINGS)
    assert comfy.utils.PROGRESS_THROTTLE_MIN_INTERVAL == 0 and comfy.utils.PROGRESS_THROTTLE_MIN_PERCENT == 0

    class QKNorm(torch.nn.Module):  # newer RMSNorm keeps its scale as .weight
        def __init__(self):
            super().__init__()
            self.query_norm = torch.nn.RMSNorm(8)
            self.key_norm = torch.nn.RMSNorm(8)

    state = comfy_harness.random_state_dict(QKNorm(), seed=0)
    assert all(0.5 < float(value.mean()) < 1.5 for value in state.values())
