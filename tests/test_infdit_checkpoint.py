"""Weight files: the released DeepSpeed/SAT layout, the converted safetensors, and refusals."""

from __future__ import annotations

import datetime
import os
import pickle
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ultrares.models.infdit._full_reference import reference_evaluation, reference_rope_table
from ultrares.cli import infdit_convert as convert
from ultrares.models.infdit.checkpoint import ROPE_TABLES, InfDiTCheckpointError, convert_checkpoint, load_infdit
from ultrares.models.infdit.files import holds_clip_tower
from ultrares.models.infdit.config import InfDiTConfig
from ultrares.models.infdit.evaluate import ImageContext, LRContext, evaluate
from ultrares.models.infdit.schedule import Placement, plan_batches, plan_schedule
from ultrares.models.infdit.attention import table_diagonal
from ultrares.models.infdit.tiny import TINY, TINY_CLIP, tiny_weights
from broken_files import CASES, PICKLE_CASES, break_file
from infdit_release import released_state_dict, save_released_layout

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

COS, SIN = ROPE_TABLES.values()
CPU = torch.device("cpu")
GRID = (3, 18)
"""Blocks of the evaluations below: 72 token columns, past the tiny model's 64-position period."""


@pytest.fixture(scope="module")
def weights():
    return tiny_weights(seed=7)


@pytest.fixture(scope="module")
def released(weights):
    return {key: value.bfloat16() for key, value in released_state_dict(weights).items()}


@pytest.fixture
def released_file(released, tmp_path):
    path = tmp_path / "mp_rank_00_model_states.pt"
    save_released_layout(released, path)
    return path


def assert_same_weights(module, reference, dtype=torch.bfloat16):
    loaded = module.state_dict()
    assert loaded.keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded[key], value.to(dtype).to(loaded[key].dtype)), key


def sat_module_tree(cfg: InfDiTConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the released DiT's state dict, written out from the reference's
    module tree (SAT ``BaseTransformer`` + the Inf-DiT mixins), independently of the loader's map."""
    d, hd, lb3 = cfg.hidden, cfg.head_dim, (3 * cfg.lr_block) ** 2
    names = {"mixins.patch_embed.proj.weight": (d, cfg.in_channels, cfg.patch, cfg.patch),
             "mixins.patch_embed.proj.bias": (d,),
             "time_embed.mlp.0.weight": (d, cfg.time_channels), "time_embed.mlp.0.bias": (d,),
             "time_embed.mlp.2.weight": (d, d), "time_embed.mlp.2.bias": (d,),
             "cond_embed.map_vector.0.weight": (d, cfg.vector_dim), "cond_embed.map_vector.0.bias": (d,),
             "cond_embed.map_vector.2.weight": (d, d), "cond_embed.map_vector.2.bias": (d,),
             "mixins.adaln_layer.re_pos_embed": (cfg.layers, 4, cfg.heads, hd),
             "mixins.adaln_layer.rope.freqs_cos": (cfg.rope_period, cfg.rope_period, hd),
             "mixins.adaln_layer.rope.freqs_sin": (cfg.rope_period, cfg.rope_period, hd),
             "mixins.adaln_layer.proj_lr.weight": (d, 3, cfg.lr_patch, cfg.lr_patch),
             "mixins.adaln_layer.proj_lr.bias": (d,),
             "mixins.adaln_layer.cross_attention.query.weight": (d, d),
             "mixins.adaln_layer.cross_attention.query.bias": (d,),
             "mixins.adaln_layer.cross_attention.key_value.weight": (2 * d, d),
             "mixins.adaln_layer.cross_attention.key_value.bias": (2 * d,),
             "mixins.adaln_layer.cross_attention.dense.weight": (d, d),
             "mixins.adaln_layer.cross_attention.dense.bias": (d,),
             "mixins.adaln_layer.post_cross_attention_layernorm.weight": (d,),
             "mixins.adaln_layer.post_cross_attention_layernorm.bias": (d,),
             "mixins.adaln_layer.lr_query_position_embedding": (1, cfg.block_tokens, cfg.heads, hd),
             "mixins.adaln_layer.lr_key_position_embedding": (1, lb3, cfg.heads, hd),
             "mixins.adaln_layer.cross_q_ln.weight": (hd,), "mixins.adaln_layer.cross_q_ln.bias": (hd,),
             "mixins.adaln_layer.cross_k_ln.weight": (hd,), "mixins.adaln_layer.cross_k_ln.bias": (hd,),
             "mixins.final_layer.adaLN_modulation.1.weight": (2 * d, d),
             "mixins.final_layer.adaLN_modulation.1.bias": (2 * d,),
             "mixins.final_layer.linear.weight": (cfg.patch ** 2 * cfg.out_channels, d),
             "mixins.final_layer.linear.bias": (cfg.patch ** 2 * cfg.out_channels,),
             "transformer.position_embeddings.weight": (256, d)}
    for i in range(cfg.layers):
        layer = f"transformer.layers.{i}."
        names.update({layer + "attention.query_key_value.weight": (3 * d, d),
                      layer + "attention.query_key_value.bias": (3 * d,),
                      layer + "attention.dense.weight": (d, d), layer + "attention.dense.bias": (d,),
                      layer + "mlp.dense_h_to_4h.weight": (cfg.mlp_ratio * d, d),
                      layer + "mlp.dense_h_to_4h.bias": (cfg.mlp_ratio * d,),
                      layer + "mlp.dense_4h_to_h.weight": (d, cfg.mlp_ratio * d),
                      layer + "mlp.dense_4h_to_h.bias": (d,),
                      f"mixins.adaln_layer.adaLN_modulations.{i}.1.weight": (4 * d, d),
                      f"mixins.adaln_layer.adaLN_modulations.{i}.1.bias": (4 * d,)})
        for norm in ("q_layer_norm", "k_layer_norm"):
            names.update({f"mixins.adaln_layer.{norm}.{i}.weight": (hd,), f"mixins.adaln_layer.{norm}.{i}.bias": (hd,)})
    return names


def test_the_test_files_follow_the_reference_module_tree(released):
    dit = {key: tuple(value.shape) for key, value in released.items() if not key.startswith("image_encoder.")}
    assert dit == sat_module_tree(TINY)


def test_the_released_layout_loads_with_its_sizes_inferred(released_file, weights):
    loaded = load_infdit(released_file)
    assert loaded.net.cfg == TINY
    assert loaded.clip.cfg == TINY_CLIP
    assert_same_weights(loaded.net, weights.net)
    assert_same_weights(loaded.clip, weights.clip)


def test_the_test_files_store_the_rope_tables_as_the_release_does(weights):
    # Whole [period, period, head_dim] buffers in bf16 (built in fp32, cast with the bf16 model),
    # also when the other weights are fp32.
    state = released_state_dict(weights)
    assert state["transformer.layers.0.attention.dense.weight"].dtype == torch.float32
    for table, fresh in zip((state[COS], state[SIN]), reference_rope_table(TINY.rope_period, TINY.head_dim)):
        assert table.dtype == torch.bfloat16 and table.shape == (64, 64, 32)
        assert torch.equal(table, fresh.bfloat16())


def evaluation_inputs(cfg: InfDiTConfig, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    height, width = GRID[0] * cfg.block_px, GRID[1] * cfg.block_px
    lr_image = (torch.rand(1, 3, height // cfg.lr_scale, width // cfg.lr_scale, generator=g) * 2 - 1).to(dtype)
    concat_lr = torch.nn.functional.interpolate(lr_image.float(), size=(height, width), mode="bicubic").clamp(-1, 1)
    x = concat_lr + 2.5 * torch.randn(concat_lr.shape, generator=g)
    return x, concat_lr.to(dtype), lr_image, torch.randn(1, cfg.vector_dim, generator=g)


def scheduled_evaluation(net, dtype: torch.dtype) -> torch.Tensor:
    """D(x; 2.5) from the block scheduler, 2 x 2-block batches."""
    x, concat_lr, lr_image, vector = evaluation_inputs(net.cfg, dtype)
    placement = Placement(CPU)
    with torch.inference_mode():
        context = ImageContext(concat_lr, LRContext(net, lr_image, placement), vector)
        schedule = plan_schedule(plan_batches(*GRID, 2, "row"))
        return evaluate(net, x, 2.5, context, schedule, placement, torch.empty_like(x))


def reference(net, dtype: torch.dtype, rope_tables) -> torch.Tensor:
    with torch.inference_mode():
        x, concat_lr, lr_image, vector = evaluation_inputs(net.cfg, dtype)
        return reference_evaluation(net, x, 2.5, concat_lr, lr_image, vector, rope_tables)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_evaluations_use_the_checkpoints_own_bf16_rope_tables_in_any_compute_dtype(released, released_file, dtype):
    net = load_infdit(released_file, dtype).net
    if dtype == torch.float16:
        # The tiled and the unfolded LR keys round differently in fp16 (by ~5e-4 of D, as much
        # as the table): without layer 0's cross-attention output the comparison sees the table alone.
        with torch.no_grad():
            net.lr_xattn.dense.weight.zero_()
            net.lr_xattn.dense.bias.zero_()
    out = scheduled_evaluation(net, dtype)
    # Both paths run the same arithmetic on the same values, whatever the dtype: 1e-5 is fp32 noise.
    assert relative(out, reference(net, dtype, (released[COS], released[SIN]))) <= 1e-5
    # A table computed afresh in fp32 gives other numbers: the test sees which table was used.
    assert relative(out, reference(net, dtype, reference_rope_table(TINY.rope_period, TINY.head_dim))) > 1e-4


def test_stored_table_values_are_used_even_where_a_recomputation_would_round_otherwise(released, tmp_path):
    # As a table built with other arithmetic (another device, bf16 maths) would: row 5's row
    # part one bf16 step off the fp32 table rounded to bf16.
    changed = dict(released)
    cos = changed[COS].clone()
    cos[5, :, :16] = torch.nextafter(cos[5, :, :16], torch.full_like(cos[5, :, :16], 2.0))
    changed[COS] = cos
    save_released_layout(changed, tmp_path / "other_table.pt")
    net = load_infdit(tmp_path / "other_table.pt").net
    assert torch.equal(net.rope.cos, table_diagonal(cos).float())
    assert relative(scheduled_evaluation(net, torch.float32), reference(net, torch.float32, (cos, changed[SIN]))) <= 1e-5


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
def test_a_converted_file_computes_exactly_what_the_released_file_computes(released_file, tmp_path, stored):
    target = tmp_path / "converted.safetensors"
    convert_checkpoint(released_file, target, stored)
    tensors = load_file(str(target))
    assert tensors["rope.cos"].shape == (64, 32) and tensors["rope.cos"].dtype == stored
    for dtype in (torch.float32, torch.float16):
        assert torch.equal(scheduled_evaluation(load_infdit(target, dtype).net, dtype),
                           scheduled_evaluation(load_infdit(released_file, dtype).net, dtype))


def with_tables(released, cos, sin):
    return {**{k: v for k, v in released.items() if k not in (COS, SIN)},
            **({COS: cos} if cos is not None else {}), **({SIN: sin} if sin is not None else {})}


def bf16_tables(period, head_dim=TINY.head_dim):
    return tuple(t.bfloat16() for t in reference_rope_table(period, head_dim))


@pytest.mark.parametrize("tables, message", [
    (bf16_tables(100), r"mixins\.adaln_layer\.rope\.freqs_cos has 100 RoPE positions per axis.*8 x image_size / patch"),
    (bf16_tables(64, 16), r"mixins\.adaln_layer\.rope\.freqs_cos \(64, 64, 16\) \(expected \(64, 64, 32\)\)"),
    ((bf16_tables(64)[0], bf16_tables(32)[1]), r"RoPE tables do not match each other: mixins\.adaln_layer\.rope\.freqs_cos "
                                               r"\(64, 64, 32\) bfloat16, mixins\.adaln_layer\.rope\.freqs_sin \(32, 32, 32\)"),
    ((bf16_tables(64)[0], bf16_tables(64)[1].float()), r"do not match each other: .*bfloat16, .*float32"),
    ((bf16_tables(64)[0][:, :32], bf16_tables(64)[1][:, :32]), r"freqs_cos \(64, 32, 32\) cannot be used: .*not \[period, period"),
    ((bf16_tables(64)[0].transpose(0, 1), bf16_tables(64)[1]), r"freqs_cos \(64, 64, 32\) cannot be used: it is not a 2D rotary"),
    ((torch.zeros(64, 64, 32, dtype=torch.int64), torch.zeros(64, 64, 32, dtype=torch.int64)), r"freqs_cos holds torch\.int64"),
    ((None, None), r"missing Inf-DiT keys: mixins\.adaln_layer\.rope\.freqs_cos, mixins\.adaln_layer\.rope\.freqs_sin"),
], ids=["period-100", "head-dim", "sizes-differ", "dtypes-differ", "not-square", "not-separable", "integers", "missing"])
def test_rope_tables_that_do_not_fit_the_configuration_are_refused_naming_the_key(released, tmp_path, tables, message):
    save_released_layout(with_tables(released, *tables), tmp_path / "odd.pt")
    with pytest.raises(InfDiTCheckpointError, match=message):
        load_infdit(tmp_path / "odd.pt")


def test_a_converted_files_tables_must_fit_its_rope_period_and_an_old_file_without_them_is_refused(released, tmp_path):
    tensors = load_file(str(convert_checkpoint_to(tmp_path, released)))
    short = {**tensors, "rope.cos": tensors["rope.cos"][:32], "rope.sin": tensors["rope.sin"][:32]}
    save_file(short, str(tmp_path / "short.safetensors"), metadata={"rope_period": "64"})
    with pytest.raises(InfDiTCheckpointError, match=r"rope\.cos \(32, 32\) \(expected \(64, 32\); rope_period 64 in the file's"):
        load_infdit(tmp_path / "short.safetensors")
    old = {k: v for k, v in tensors.items() if not k.startswith("rope.")}
    save_file(old, str(tmp_path / "old.safetensors"), metadata={"rope_period": "64"})
    with pytest.raises(InfDiTCheckpointError, match="no RoPE tables.*Convert the released checkpoint again"):
        load_infdit(tmp_path / "old.safetensors")


class StandInOperations:
    """An ``operations`` namespace shaped like ``comfy.ops.disable_weight_init``: subclasses of
    torch.nn's layers that skip the random initialisation (the loader assigns the weights)."""

    class Linear(torch.nn.Linear):
        def reset_parameters(self) -> None:
            return None

    class Conv2d(torch.nn.Conv2d):
        def reset_parameters(self) -> None:
            return None

    class LayerNorm(torch.nn.LayerNorm):
        def reset_parameters(self) -> None:
            return None


def test_the_loader_builds_both_networks_from_the_given_operations(released_file):
    weights = load_infdit(released_file, operations=StandInOperations)
    stand_ins = (StandInOperations.Linear, StandInOperations.Conv2d, StandInOperations.LayerNorm)
    for module in (weights.net, weights.clip):
        layers = [m for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm))]
        assert layers and all(isinstance(layer, stand_ins) for layer in layers)
    plain = load_infdit(released_file)
    assert torch.equal(scheduled_evaluation(weights.net, torch.float32), scheduled_evaluation(plain.net, torch.float32))
    pixels = torch.randn(1, 3, TINY_CLIP.image_size, TINY_CLIP.image_size)
    assert torch.equal(weights.clip.encode(pixels), plain.clip.encode(pixels))


def test_the_released_file_is_refused_by_plain_weights_only_loading(released_file):
    # Its numpy RNG state is why the loader names the numpy types it may build.
    with pytest.raises(Exception, match="numpy"):
        torch.load(released_file, weights_only=True)


def test_converting_round_trips_to_safetensors_with_the_packs_names(released_file, weights, tmp_path):
    target = tmp_path / "infdit.safetensors"
    assert convert_checkpoint(released_file, target) == TINY
    tensors = load_file(str(target))
    assert "blocks.1.qkv.weight" in tensors and "clip.conv1.weight" in tensors
    assert "blocks.0.block_bias" in tensors and not any(key.startswith("mixins.") for key in tensors)
    assert all(value.dtype == torch.bfloat16 for value in tensors.values())
    again = load_infdit(target)
    assert again.net.cfg == TINY
    assert_same_weights(again.net, weights.net)
    assert_same_weights(again.clip, weights.clip)


def test_other_sizes_are_inferred_from_the_shapes(tmp_path):
    cfg = InfDiTConfig(hidden=96, layers=3, heads=3, patch=2, block=8, lr_block=2, time_channels=16, vector_dim=8,
                       rope_period=32)
    weights = tiny_weights(seed=1, cfg=cfg, clip_cfg=None)
    path = tmp_path / "other.pt"
    save_released_layout(released_state_dict(weights), path)
    loaded = load_infdit(path)
    assert loaded.net.cfg == cfg and loaded.clip is None


def test_the_unused_key_layernorms_do_not_matter(released, tmp_path):
    changed = dict(released)
    changed["mixins.adaln_layer.k_layer_norm.0.weight"] = torch.full_like(changed["mixins.adaln_layer.k_layer_norm.0.weight"], 7)
    save_released_layout(released, tmp_path / "a.pt")
    save_released_layout(changed, tmp_path / "b.pt")
    assert_same_weights(load_infdit(tmp_path / "b.pt").net, load_infdit(tmp_path / "a.pt").net)


def test_a_missing_key_is_named_in_the_files_own_naming(released, tmp_path):
    broken = {k: v for k, v in released.items() if k != "transformer.layers.1.mlp.dense_4h_to_h.bias"}
    save_released_layout(broken, tmp_path / "broken.pt")
    with pytest.raises(InfDiTCheckpointError, match=r"missing Inf-DiT keys: transformer\.layers\.1\.mlp\.dense_4h_to_h\.bias"):
        load_infdit(tmp_path / "broken.pt")


def test_unexpected_keys_are_named(released, tmp_path):
    extra = dict(released, **{"mixins.adaln_layer.extra_gate.weight": torch.zeros(3)})
    save_released_layout(extra, tmp_path / "extra.pt")
    with pytest.raises(InfDiTCheckpointError, match=r"^extra\.pt: unexpected Inf-DiT keys: mixins\.adaln_layer\.extra_gate"):
        load_infdit(tmp_path / "extra.pt")
    tensors = load_file(str(convert_checkpoint_to(tmp_path, released)))
    tensors["blocks.0.gate.weight"] = torch.zeros(2)
    save_file(tensors, str(tmp_path / "extra.safetensors"))
    with pytest.raises(InfDiTCheckpointError, match=r"unexpected Inf-DiT keys: blocks\.0\.gate\.weight"):
        load_infdit(tmp_path / "extra.safetensors")


def convert_checkpoint_to(tmp_path, released):
    save_released_layout(released, tmp_path / "src.pt")
    convert_checkpoint(tmp_path / "src.pt", tmp_path / "converted.safetensors")
    return tmp_path / "converted.safetensors"


def test_a_shape_that_does_not_fit_the_inferred_sizes_is_named(released, tmp_path):
    wrong = dict(released)
    wrong["transformer.layers.1.attention.dense.weight"] = torch.zeros(64, 32, dtype=torch.bfloat16)
    save_released_layout(wrong, tmp_path / "wrong.pt")
    with pytest.raises(InfDiTCheckpointError, match=r"transformer\.layers\.1\.attention\.dense\.weight \(64, 32\) \(expected \(64, 64\)\)"):
        load_infdit(tmp_path / "wrong.pt")


def test_a_file_of_another_model_is_refused(tmp_path):
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)}, str(tmp_path / "flux.safetensors"))
    with pytest.raises(InfDiTCheckpointError, match="not an Inf-DiT checkpoint"):
        load_infdit(tmp_path / "flux.safetensors")


def test_an_unknown_pickled_object_is_refused_by_name_unless_allowed(released, tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"module": released, "elapsed": datetime.timedelta(hours=3)}, path)
    with pytest.raises(InfDiTCheckpointError, match=r"datetime\.timedelta.*--allow-global datetime\.timedelta"):
        load_infdit(path)
    assert load_infdit(path, allow_globals=("datetime.timedelta",)).net.cfg == TINY


class Pickled:
    """An object that pickles as a call of ``function(*args)`` (torch.load would make that call)."""

    def __init__(self, function, *args):
        self.call = (function, args)

    def __reduce__(self):
        return self.call


@pytest.mark.parametrize("payload, name", [(Pickled(os.system, "exit 0"), "posix.system"),
                                           (Pickled(eval, "0"), "builtins.eval"),
                                           (Pickled(subprocess.Popen, ["true"]), "subprocess.Popen")],
                         ids=["os.system", "eval", "subprocess"])
def test_a_pickle_that_runs_commands_is_refused_by_name_without_advice_to_allow_it(released, tmp_path, payload, name):
    if os.name == "nt" and name == "posix.system":
        name = "nt.system"
    path = tmp_path / "hostile.pt"
    torch.save({"module": released, "client_state": payload}, path)
    with pytest.raises(InfDiTCheckpointError) as refused:
        load_infdit(path)
    text = str(refused.value)
    assert f"pickled call of {name}, which runs commands or code" in text
    assert not any(advice in text for advice in ("weights_only", "allow-global", "allow_globals", "safe_globals"))
    with pytest.raises(InfDiTCheckpointError, match="will not allow the pickled global"):
        load_infdit(path, allow_globals=(name,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_a_pickle_the_safe_loader_cannot_read_is_refused_without_torchs_advice_to_load_it_unsafely(tmp_path):
    path = tmp_path / "protocol4.pt"
    path.write_bytes(pickle.dumps({"module": {}}, protocol=4))
    with pytest.raises(InfDiTCheckpointError, match=r"cannot read the file as a torch checkpoint \(Unsupported operand") as refused:
        load_infdit(path)
    assert "weights_only" not in str(refused.value)


def test_clip_comes_from_a_separate_openclip_file_when_the_checkpoint_has_none(weights, tmp_path):
    dit_only = {k: v for k, v in released_state_dict(weights).items() if not k.startswith("image_encoder.")}
    save_released_layout(dit_only, tmp_path / "dit.pt")
    assert load_infdit(tmp_path / "dit.pt").clip is None
    openclip = {f"visual.{k}": v for k, v in weights.clip.state_dict().items()}
    openclip.update({"token_embedding.weight": torch.zeros(4, 2), "ln_final.weight": torch.ones(2),
                     "transformer.resblocks.0.attn.in_proj_weight": torch.zeros(6, 2), "logit_scale": torch.ones(())})
    torch.save(openclip, tmp_path / "open_clip_pytorch_model.bin")
    loaded = load_infdit(tmp_path / "dit.pt", clip_path=tmp_path / "open_clip_pytorch_model.bin")
    assert_same_weights(loaded.clip, weights.clip, torch.float32)


def test_the_clip_tower_list_holds_the_openclip_towers_and_never_the_checkpoint_told_without_loading(
        weights, tmp_path, monkeypatch):
    tower = {f"visual.{k}": v.contiguous() for k, v in weights.clip.state_dict().items()}
    openclip = dict(tower, **{"token_embedding.weight": torch.zeros(4, 2), "logit_scale": torch.ones(()),
                              "transformer.resblocks.0.attn.in_proj_weight": torch.zeros(6, 2)})
    torch.save(openclip, tmp_path / "open_clip_pytorch_model.bin")       # as released (a torch.save archive)
    save_file(tower, str(tmp_path / "tower.safetensors"))                 # any name: the keys tell
    save_file({k[len("visual."):]: v for k, v in tower.items()}, str(tmp_path / "bare.safetensors"))
    save_released_layout(released_state_dict(weights), tmp_path / "mp_rank_00_model_states.pt")  # has a tower inside
    convert_checkpoint(tmp_path / "mp_rank_00_model_states.pt", tmp_path / "infdit.safetensors", torch.float32)
    save_file({"vision_model.embeddings.patch_embedding.weight": torch.zeros(2, 3, 1, 1)},
              str(tmp_path / "clip_vision_hf.safetensors"))                # ComfyUI's HF layout: not this tower
    (tmp_path / "clip_cut_short.bin").write_bytes(b"PK\x03\x04 broken")  # unreadable: kept by its name, refused
    (tmp_path / "notes.bin").write_bytes(b"")                              # when chosen; others are left out
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a tensor was loaded"))
    listed = sorted(path.name for path in tmp_path.iterdir() if holds_clip_tower(path))
    assert listed == ["bare.safetensors", "clip_cut_short.bin", "open_clip_pytorch_model.bin", "tower.safetensors"]


def test_a_clip_file_with_foreign_keys_is_refused(weights, tmp_path):
    odd = {f"visual.{k}": v for k, v in weights.clip.state_dict().items()}
    odd["decoder.weight"] = torch.zeros(2)
    save_file(odd, str(tmp_path / "clip.safetensors"))
    save_released_layout(released_state_dict(weights), tmp_path / "dit.pt")
    with pytest.raises(InfDiTCheckpointError, match=r"^clip\.safetensors: unexpected CLIP image tower keys: decoder\.weight.*open_clip_pytorch_model\.bin"):
        load_infdit(tmp_path / "dit.pt", clip_path=tmp_path / "clip.safetensors")


def test_the_converter_command_reports_the_model_and_refusals(released_file, tmp_path, capsys):
    assert convert.main([str(released_file), str(tmp_path / "out.safetensors"), "--dtype", "fp32"]) == 0
    assert "2 layers, width 64, 2 heads, 16-px blocks" in capsys.readouterr().out
    assert load_file(str(tmp_path / "out.safetensors"))["blocks.0.qkv.weight"].dtype == torch.float32
    save_file({"x": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    assert convert.main([str(tmp_path / "bad.safetensors"), str(tmp_path / "o.safetensors")]) == 1
    assert "not an Inf-DiT checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "o.safetensors.partial").exists()


def test_the_converter_runs_by_path_as_from_a_comfyui_install(released_file, tmp_path, monkeypatch, capsys):
    # python custom_nodes/ComfyUI-UltraRes/cli/infdit_convert.py ...: cli/ is first on sys.path and
    # the tool runs as ultrares.cli.infdit_convert (a fresh process loading the checkout as
    # ultrares is tested with the GSPN command line, integration/test_gspn_cli.py).
    script = Path(convert.__file__)
    assert script.parent.name == "cli"
    monkeypatch.syspath_prepend(str(script.parent))
    monkeypatch.setattr(sys, "argv", [str(script), str(released_file), str(tmp_path / "by_path.safetensors")])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(script), run_name="__main__")
    assert exited.value.code == 0 and "wrote" in capsys.readouterr().out
    assert load_infdit(tmp_path / "by_path.safetensors").net.cfg == TINY


@pytest.mark.parametrize("case", list(PICKLE_CASES))
def test_a_broken_released_file_is_refused_naming_it_and_where_to_get_it(released_file, case):
    with pytest.raises(InfDiTCheckpointError, match=rf"^{released_file.name} {PICKLE_CASES[case]}.*"
                                                    r"mp_rank_00_model_states\.pt, linked from the THUDM/Inf-DiT README"):
        load_infdit(break_file(released_file, case))


@pytest.mark.parametrize("case", list(CASES))
def test_a_broken_converted_file_is_refused_the_same_way(released, tmp_path, case):
    converted = convert_checkpoint_to(tmp_path, released)
    with pytest.raises(InfDiTCheckpointError, match=rf"^converted\.safetensors {CASES[case]}.*cli/infdit_convert\.py"):
        load_infdit(break_file(converted, case))


@pytest.mark.parametrize("case", list(CASES))
def test_a_broken_clip_file_is_refused_naming_it_not_the_checkpoint(weights, tmp_path, case):
    save_released_layout(released_state_dict(weights), tmp_path / "dit.pt")
    clip = tmp_path / "open_clip.safetensors"
    save_file({f"visual.{k}": v.contiguous() for k, v in weights.clip.state_dict().items()}, str(clip))
    with pytest.raises(InfDiTCheckpointError, match=rf"^open_clip\.safetensors {CASES[case]}.*"
                                                    r"laion/CLIP-ViT-L-14-DataComp\.XL-s13B-b90K"):
        load_infdit(tmp_path / "dit.pt", clip_path=break_file(clip, case))


def test_a_clip_tower_of_another_size_is_named_in_the_same_words(weights, tmp_path):
    save_released_layout(released_state_dict(weights), tmp_path / "dit.pt")
    state = {f"visual.{k}": v for k, v in weights.clip.state_dict().items()}
    state["visual.ln_post.weight"] = torch.ones(3)
    save_file(state, str(tmp_path / "clip.safetensors"))
    with pytest.raises(InfDiTCheckpointError, match=r"^clip\.safetensors: CLIP image tower keys of another shape: "
                                                    r"ln_post\.weight \(3,\) \(expected \(\d+,\)\)"):
        load_infdit(tmp_path / "dit.pt", clip_path=tmp_path / "clip.safetensors")
