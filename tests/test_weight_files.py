"""Opening, checking and writing weight files (models/weight_files.py): what every loader of the
pack says about a broken file, and what its error type looks like in ComfyUI's error dialog."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from broken_files import CASES, PICKLE_CASES, break_file
from ultrares.models.weight_files import (FileKind, WeightFileError, identify, key_sections, name_first, read_weights,
                                          save_safetensors, write_atomically)


class ExampleError(WeightFileError):
    """The error of the example loader."""


CLEAR_LIKE = {"transformer_blocks.0.attn.to_q.weight": torch.ones(2, 2)}
KIND = FileKind(name="CLEAR weights", error=ExampleError, remedy="Download it again.",
                holds="they hold attention projections")


def dialog_type_name(error_type: type) -> str:
    """What ComfyUI's error dialog shows as the exception type (``full_type_name`` in its
    execution.py, the same in 0.3.64 and 04e2a914 on the 0.38 line)."""
    module = error_type.__module__
    return error_type.__qualname__ if module == "builtins" else f"{module}.{error_type.__qualname__}"


def test_the_dialog_shows_an_error_types_bare_name_and_the_error_still_pickles():
    assert dialog_type_name(ExampleError) == "ExampleError"
    error = pickle.loads(pickle.dumps(ExampleError("x.safetensors is empty")))
    assert type(error) is ExampleError and str(error) == "x.safetensors is empty"
    assert isinstance(error, ValueError)


@pytest.mark.parametrize("case", list(CASES))
def test_a_broken_safetensors_file_is_refused_naming_it_what_is_wrong_and_what_to_do(tmp_path, case):
    path = tmp_path / "clear_local_8.safetensors"
    save_file({**CLEAR_LIKE, "transformer_blocks.0.attn.to_k.weight": torch.ones(64, 64)}, str(path))
    break_file(path, case)
    with pytest.raises(ExampleError, match=rf"^clear_local_8\.safetensors {CASES[case]}.*Download it again\.$"):
        read_weights(path, KIND)


@pytest.mark.parametrize("case", list(PICKLE_CASES))
def test_a_broken_torch_file_is_refused_naming_it_what_is_wrong_and_what_to_do(tmp_path, case):
    path = tmp_path / "model.pt"
    torch.save({"state_dict": {**CLEAR_LIKE, "transformer_blocks.0.attn.to_k.weight": torch.ones(64, 64)}}, path)
    break_file(path, case)
    with pytest.raises(ExampleError, match=rf"^model\.pt {PICKLE_CASES[case]}.*Download it again\.$"):
        read_weights(path, KIND)


def test_a_legacy_pickle_cut_short_is_incomplete(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save(CLEAR_LIKE, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ExampleError, match=r"legacy\.pt is incomplete: its data ends early"):
        read_weights(path, KIND)


def test_a_file_named_for_the_other_format_is_told_to_be_renamed(tmp_path):
    torch.save(CLEAR_LIKE, tmp_path / "saved.safetensors")
    with pytest.raises(ExampleError, match=r"saved\.safetensors is a PyTorch checkpoint \(torch\.save\), not a "
                                           r"safetensors file as its name says: rename it to end in \.pt"):
        read_weights(tmp_path / "saved.safetensors", KIND)
    save_file(CLEAR_LIKE, str(tmp_path / "saved.pt"))
    with pytest.raises(ExampleError, match=r"saved\.pt is a safetensors file, not a PyTorch checkpoint"):
        read_weights(tmp_path / "saved.pt", KIND)


def test_a_format_the_loader_does_not_read_is_named(tmp_path):
    torch.save(CLEAR_LIKE, tmp_path / "weights.pt")
    only_safetensors = FileKind(name="GSPN weights made by this pack", error=ExampleError, remedy="Distil it again.",
                                holds="-", formats=("safetensors",))
    with pytest.raises(ExampleError, match=r"weights\.pt is a PyTorch checkpoint \(torch\.save\), not GSPN weights made "
                                           r"by this pack \(read from safetensors files only\)\. Distil it again\."):
        read_weights(tmp_path / "weights.pt", only_safetensors)


@pytest.mark.parametrize("content, what", [
    (b"GGUF\x03\x00\x00\x00" + bytes(64), "a GGUF file"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 12\n", "a Git LFS pointer"),
    (bytes(range(64)), "in no weights format this pack reads"),
])
def test_files_in_other_formats_say_what_they_are(tmp_path, content, what):
    (tmp_path / "x.safetensors").write_bytes(content)
    with pytest.raises(ExampleError, match=rf"x\.safetensors is not a safetensors file: it is {what}"):
        read_weights(tmp_path / "x.safetensors", KIND)


@pytest.mark.parametrize("keys, metadata, what", [
    (["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"], None, "a FLUX LoRA"),
    (["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"], None, "a FLUX LoRA"),
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], None, "a LoRA"),
    (["double_blocks.0.img_attn.qkv.weight", "img_in.weight"], None, "a FLUX diffusion model"),
    (["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.down.0.block.0.conv1.weight"], None,
     "an SD1.5/SDXL checkpoint"),
    (["encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1.weight"], None, "a VAE"),
    (["encoder.block.0.layer.0.SelfAttention.q.weight"], None, "a text encoder (CLIP or T5)"),
    (["vision_model.embeddings.patch_embedding.weight"], None, "a CLIP vision model in ComfyUI's (Hugging Face) layout"),
    (["transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.0.attn.to_k.bias"], None, "CLEAR weights"),
    (["transformer.layers.0.attention.query_key_value.weight"], None, "an Inf-DiT checkpoint"),
    (["blocks.0.qkv.weight", "lr_xattn.query.weight"], None, "an Inf-DiT checkpoint"),
    (["visual.conv1.weight", "token_embedding.weight"], None, "an OpenCLIP image tower"),
    (["input_blocks.1.1.transformer_blocks.0.attn1.to_proxy.weight"], {"format": "ultrares.gspn"},
     "GSPN weights made by this pack"),
    (["a", "b"], None, None),
], ids=lambda value: value if isinstance(value, str) else None)
def test_model_files_of_other_kinds_are_told_apart_by_their_keys(keys, metadata, what):
    found = identify(keys, metadata)
    assert (found[0] if found else None) == what


def test_a_model_of_another_kind_is_named_with_where_it_belongs(tmp_path):
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2)}, str(tmp_path / "flux1-dev.safetensors"))
    with pytest.raises(ExampleError, match=r"^flux1-dev\.safetensors is a FLUX diffusion model, not CLEAR weights: it "
                                           r"goes into models/diffusion_models\. Download it again\.$"):
        read_weights(tmp_path / "flux1-dev.safetensors", KIND)
    torch.save({"weight": torch.zeros(2)}, tmp_path / "unknown.pt")
    with pytest.raises(ExampleError, match=r"^unknown\.pt is not CLEAR weights: they hold attention projections, but "
                                           r"its first keys are weight\. Download it again\.$"):
        read_weights(tmp_path / "unknown.pt", KIND)


def test_a_good_file_reads_with_its_metadata_by_the_packs_reader_or_the_callers(tmp_path):
    save_file(CLEAR_LIKE, str(tmp_path / "good.safetensors"), metadata={"window_size": "8"})
    state, metadata = read_weights(tmp_path / "good.safetensors", KIND)
    assert torch.equal(state["transformer_blocks.0.attn.to_q.weight"], torch.ones(2, 2))
    assert metadata == {"window_size": "8"}

    def failing(path):
        raise RuntimeError("the host could not map the file")

    with pytest.raises(ExampleError, match=r"good\.safetensors: cannot read the file as a safetensors file \(the host "
                                           r"could not map the file\)\. Download it again\."):
        read_weights(tmp_path / "good.safetensors", KIND, load=failing)


def test_keys_are_worded_the_same_way_for_every_loader():
    found = {"a.weight": (2, 3), "b.weight": (3,), "extra.2": (1,), "extra.10": (1,)}
    expected = {"a.weight": (3, 3), "b.weight": (3,), "c.weight": (3,), "d.bias": None}
    assert key_sections(found, expected, "Example") == [
        "missing Example keys: c.weight, d.bias",
        "unexpected Example keys: extra.2, extra.10",
        "Example keys of another shape: a.weight (2, 3) (expected (3, 3))"]
    assert name_first([f"k{i}" for i in range(8)], shown=3) == "k0, k1, k2 (+5 more)"


def test_an_atomic_write_leaves_the_old_file_when_it_fails_and_nothing_beside_it(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_safetensors({"x": torch.ones(2)}, path, {"step": "1"})
    with pytest.raises(RuntimeError, match="disk full"), write_atomically(path) as partial:
        partial.write_bytes(b"half a file")
        raise RuntimeError("disk full")
    assert torch.equal(load_file(str(path))["x"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    save_safetensors({"x": torch.zeros(2)}, path)
    assert torch.equal(load_file(str(path))["x"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
