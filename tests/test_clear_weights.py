"""Released CLEAR files onto a Flux (models/clear/weights.py): the exact key set, where each
tensor goes, and refusals that name the first keys that do not fit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from broken_files import CASES, PICKLE_CASES, break_file
from comfy_harness import clear_released_state_dict
from ultrares.models.clear.weights import ClearWeightsError, plan_weights, read_clear_file, released_keys

HIDDEN, DEPTH, DEPTH_SINGLE = 8, 2, 3


def host_key_map(depth: int, depth_single: int, hidden: int) -> dict:
    """Attention entries of a host's diffusers -> Flux key map, in the format of ComfyUI's
    ``comfy.utils.flux_to_diffusers`` (fused q/k/v as row slices ``(0, start, length)``)."""
    key_map = {}
    for prefix, count, fused in (("transformer_blocks", depth, "double_blocks.{}.img_attn.qkv"),
                                 ("single_transformer_blocks", depth_single, "single_blocks.{}.linear1")):
        for i in range(count):
            for end in ("weight", "bias"):
                for j, name in enumerate(("to_q", "to_k", "to_v")):
                    key_map[f"{prefix}.{i}.attn.{name}.{end}"] = (
                        f"diffusion_model.{fused.format(i)}.{end}", (0, j * hidden, hidden))
                if prefix == "transformer_blocks":
                    key_map[f"{prefix}.{i}.attn.to_out.0.{end}"] = f"diffusion_model.double_blocks.{i}.img_attn.proj.{end}"
    return key_map


def flux_shapes(depth: int, depth_single: int, hidden: int) -> dict:
    shapes = {}
    for i in range(depth):
        shapes[f"diffusion_model.double_blocks.{i}.img_attn.qkv.weight"] = (3 * hidden, hidden)
        shapes[f"diffusion_model.double_blocks.{i}.img_attn.qkv.bias"] = (3 * hidden,)
        shapes[f"diffusion_model.double_blocks.{i}.img_attn.proj.weight"] = (hidden, hidden)
        shapes[f"diffusion_model.double_blocks.{i}.img_attn.proj.bias"] = (hidden,)
    for i in range(depth_single):
        shapes[f"diffusion_model.single_blocks.{i}.linear1.weight"] = (7 * hidden, hidden)
        shapes[f"diffusion_model.single_blocks.{i}.linear1.bias"] = (7 * hidden,)
    return shapes


def plan(state, depth=DEPTH, depth_single=DEPTH_SINGLE, **kwargs):
    return plan_weights(state, host_key_map(DEPTH, DEPTH_SINGLE, HIDDEN), flux_shapes(DEPTH, DEPTH_SINGLE, HIDDEN),
                        depth, depth_single, "clear_test.safetensors", **kwargs)


def test_a_released_file_holds_every_attention_projection_and_optionally_the_spatial_weights():
    keys = released_keys(19, 38, down_sampled=True)
    assert len(keys) == 19 * (8 + 1) + 38 * (6 + 1)
    assert "transformer_blocks.18.attn.to_out.0.bias" in keys
    assert "single_transformer_blocks.37.attn.processor.spatial_weight" in keys
    assert not any("to_out" in k for k in keys if k.startswith("single"))
    assert len(released_keys(19, 38, down_sampled=False)) == 19 * 8 + 38 * 6


def test_every_projection_replaces_its_slice_of_the_fused_layers():
    state = clear_released_state_dict(DEPTH, DEPTH_SINGLE, HIDDEN)
    weights = plan(state)
    placed = {(p.target, p.offset): p.tensor for p in weights.patches}
    assert len(placed) == len(state) == DEPTH * 8 + DEPTH_SINGLE * 6
    assert placed[("diffusion_model.double_blocks.1.img_attn.qkv.weight", (0, HIDDEN, HIDDEN))] is \
        state["transformer_blocks.1.attn.to_k.weight"]
    assert placed[("diffusion_model.single_blocks.2.linear1.bias", (0, 2 * HIDDEN, HIDDEN))] is \
        state["single_transformer_blocks.2.attn.to_v.bias"]
    assert placed[("diffusion_model.double_blocks.0.img_attn.proj.weight", None)] is \
        state["transformer_blocks.0.attn.to_out.0.weight"]
    assert weights.spatial_weights == {} and weights.spatial_size is None


def test_spatial_weights_are_read_per_block_row_offset_first():
    state = clear_released_state_dict(DEPTH, DEPTH_SINGLE, HIDDEN, down_factor=4)
    state["single_transformer_blocks.2.attn.processor.spatial_weight"] = torch.zeros(1, 1, 1, 4, 1, 4, 1)
    state["single_transformer_blocks.2.attn.processor.spatial_weight"][0, 0, 0, 1, 0, 3, 0] = 5.0
    weights = plan(state)
    assert weights.spatial_size == 4
    assert set(weights.spatial_weights) == {("double", i) for i in range(DEPTH)} | {("single", i) for i in range(DEPTH_SINGLE)}
    single = weights.spatial_weights[("single", 2)]
    assert single.shape == (4, 4) and single[1, 3] == 5.0 and single.sum() == 5.0


def test_a_file_for_another_depth_is_refused_naming_the_keys():
    with pytest.raises(ClearWeightsError, match=r"^clear_test\.safetensors does not fit this Flux \(2 double \+ 3 single "
                                               r"blocks\): missing CLEAR keys: .*single_transformer_blocks\.2\.attn\.to_q\.weight"):
        plan(clear_released_state_dict(DEPTH, DEPTH_SINGLE - 1, HIDDEN))
    with pytest.raises(ClearWeightsError, match=r"\(2 double \+ 3 single blocks\): unexpected CLEAR keys: "
                                               r"transformer_blocks\.2\..*Huage001/CLEAR"):
        plan(clear_released_state_dict(DEPTH + 1, DEPTH_SINGLE, HIDDEN))
    state = clear_released_state_dict(DEPTH, DEPTH_SINGLE, HIDDEN)
    state["transformer_blocks.0.attn.add_q_proj.weight"] = torch.zeros(HIDDEN, HIDDEN)
    with pytest.raises(ClearWeightsError, match=r"unexpected CLEAR keys: transformer_blocks\.0\.attn\.add_q_proj\.weight"):
        plan(state)


def test_a_file_for_another_width_is_refused_naming_the_first_shapes():
    with pytest.raises(ClearWeightsError, match=r"CLEAR keys of another shape: transformer_blocks\.0\.attn\.to_q\.weight "
                                               r"\(16, 16\) \(expected \(8, 8\)\).*\(\+\d+ more\)"):
        plan(clear_released_state_dict(DEPTH, DEPTH_SINGLE, 2 * HIDDEN))


def test_keys_the_host_cannot_place_are_refused():
    state = clear_released_state_dict(DEPTH, DEPTH_SINGLE, HIDDEN)
    key_map = host_key_map(DEPTH, DEPTH_SINGLE, HIDDEN)
    del key_map["single_transformer_blocks.1.attn.to_k.bias"]
    shapes = flux_shapes(DEPTH, DEPTH_SINGLE, HIDDEN)
    shapes["diffusion_model.single_blocks.0.linear1.weight"] = (2 * HIDDEN, HIDDEN)
    with pytest.raises(ClearWeightsError) as error:
        plan_weights(state, key_map, shapes, DEPTH, DEPTH_SINGLE, "f")
    assert "CLEAR keys with no place on this model: single_transformer_blocks.0.attn.to_v.weight " \
           "(diffusion_model.single_blocks.0.linear1.weight[dim 0: 16:24] is outside its shape (16, 8))" in str(error.value)
    assert "single_transformer_blocks.1.attn.to_k.bias (not in the host's key map)" in str(error.value)


def test_malformed_spatial_weights_are_refused():
    state = clear_released_state_dict(DEPTH, DEPTH_SINGLE, HIDDEN, down_factor=2)
    state["transformer_blocks.1.attn.processor.spatial_weight"] = torch.ones(1, 1, 1, 4, 1, 4, 1)
    with pytest.raises(ClearWeightsError, match=r"sizes differ between layers: \[2, 4\]"):
        plan(state)
    state["transformer_blocks.1.attn.processor.spatial_weight"] = torch.ones(3, 5)
    with pytest.raises(ClearWeightsError, match=r"transformer_blocks\.1\.attn\.processor\.spatial_weight has shape \(3, 5\)"):
        plan(state)


def test_planning_reports_progress_and_can_be_cancelled():
    state = clear_released_state_dict(DEPTH, DEPTH_SINGLE, HIDDEN)
    progress = []
    plan(state, on_progress=lambda done, total: progress.append((done, total)))
    assert progress[-1] == (len(state), len(state)) and len(progress) == len(state)

    def cancel():
        raise InterruptedError

    with pytest.raises(InterruptedError):
        plan(state, check_interrupt=cancel)


def test_a_released_file_reads_with_its_metadata(tmp_path):
    state = clear_released_state_dict(DEPTH, DEPTH_SINGLE, HIDDEN, down_factor=2)
    save_file(state, str(tmp_path / "clear_local_8_down_2.safetensors"), metadata={"window_size": "8"})
    read, metadata = read_clear_file(tmp_path / "clear_local_8_down_2.safetensors")
    assert read.keys() == state.keys() and metadata == {"window_size": "8"}
    assert plan(read).spatial_size == 2


@pytest.mark.parametrize("case", list(CASES))
def test_a_broken_file_is_refused_naming_it_and_where_good_ones_come_from(tmp_path, case):
    path = tmp_path / "clear_local_8.safetensors"
    save_file(clear_released_state_dict(DEPTH, DEPTH_SINGLE, HIDDEN), str(path))
    with pytest.raises(ClearWeightsError, match=rf"^clear_local_8\.safetensors {CASES[case]}.*Huage001/CLEAR"):
        read_clear_file(break_file(path, case))


@pytest.mark.parametrize("case", list(PICKLE_CASES))
def test_a_broken_torch_file_is_refused_the_same_way(tmp_path, case):
    path = tmp_path / "clear_local_8.pt"
    torch.save(clear_released_state_dict(DEPTH, DEPTH_SINGLE, HIDDEN), path)
    with pytest.raises(ClearWeightsError, match=rf"^clear_local_8\.pt {PICKLE_CASES[case]}.*Huage001/CLEAR"):
        read_clear_file(break_file(path, case))
