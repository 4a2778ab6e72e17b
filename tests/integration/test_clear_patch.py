"""The CLEAR patch node on a tiny real ComfyUI Flux (CPU): released-layout files load onto the
model, the patched model equals a hand-built CLEAR forward through ComfyUI's sampler, and the
original model, other patches and other attention overrides are left intact, including
overrides that nodes applied after CLEAR install (newer ComfyUI's attention backend and
sparse attention nodes, as stand-ins where 0.3.64 lacks them)."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import types

import pytest
import torch
from safetensors.torch import save_file

import comfy_harness

CFG = comfy_harness.TINY_FLUX_CONFIG
HIDDEN = CFG["hidden_size"]
HEADS = CFG["num_heads"]
DEPTH, DEPTH_SINGLE = CFG["depth"], CFG["depth_single_blocks"]
LATENT = (1, 16, 14, 20)  # -> a 7 x 10 token grid (odd height: the last row feeds no 2x2 cell)
GRID = (7, 10)
TEXT_TOKENS = 7


def write_file(folder, name: str, state: dict, metadata: dict | None = None) -> str:
    save_file(state, str(folder / name), metadata=metadata)
    return name


def patch(pack_nodes, model, weights="none", radius=0, down=0, ntk=1.0, proportional=False, min_tokens=0,
          backend="auto"):
    node = pack_nodes["UltraResClearPatch"]
    (patched,) = node.execute(model, weights, radius, down, ntk, proportional, min_tokens, backend).result
    return patched


def run(model, latent_shape=LATENT, reference_latents=None, seed=3, cfg=1.0) -> torch.Tensor:
    """Sample with ComfyUI's KSampler; ``cfg > 1`` batches cond and uncond into each call."""
    cond = comfy_harness.flux_conditioning(batch=latent_shape[0], tokens=TEXT_TOKENS)
    uncond = comfy_harness.flux_conditioning(batch=latent_shape[0], tokens=TEXT_TOKENS, seed=1)
    if reference_latents is not None:
        cond[0][1]["reference_latents"] = reference_latents
    return comfy_harness.sample(model, cond, uncond, torch.zeros(latent_shape), seed=seed, cfg=cfg)


class HandBuiltClear:
    """CLEAR attention written out from the reference repository, independent of the pack: the
    mask of ``local_dwonsample_mask`` on token indices (reference tokens global like text), the
    ``spatial_weight`` cell sum, the proportional scale, and the block known from the call order
    (double blocks, then single blocks, once per forward)."""

    def __init__(self, grid, radius, down=1, spatial=None, proportional=False, n_ref=0):
        self.grid, self.radius, self.down, self.spatial = grid, radius, down, spatial or {}
        self.proportional, self.n_ref = proportional, n_ref
        self.order = [("double", i) for i in range(DEPTH)] + [("single", i) for i in range(DEPTH_SINGLE)]
        self.calls = 0

    def __call__(self, func, q, k, v, heads, **kwargs):
        block = self.order[self.calls % len(self.order)]
        self.calls += 1
        h, w = self.grid
        length, dim = q.shape[2], q.shape[3]
        n_txt = length - h * w - self.n_ref
        d = self.down
        if d > 1:
            weight = self.spatial.get(block, torch.full((d, d), 1.0 / d ** 2)).reshape(1, 1, 1, d, 1, d, 1)
            rows, cols = h // d, w // d
            cells = [(t[:, :, n_txt:n_txt + h * w].unflatten(2, (h, w))[:, :, :rows * d, :cols * d]
                      .reshape(*t.shape[:2], rows, d, cols, d, dim) * weight).sum(dim=(3, 5)).flatten(2, 3)
                     for t in (k, v)]
            k, v = torch.cat([k, cells[0]], dim=2), torch.cat([v, cells[1]], dim=2)
        q_idx = torch.arange(length)[:, None]
        kv_idx = torch.arange(k.shape[2])[None, :]
        q_y, q_x = (q_idx - n_txt) // w, (q_idx - n_txt) % w
        kv_y, kv_x = (kv_idx - n_txt) // w, (kv_idx - n_txt) % w
        q_global = (q_idx < n_txt) | (q_idx >= n_txt + h * w)
        kv_global = (kv_idx < n_txt) | ((kv_idx >= n_txt + h * w) & (kv_idx < length))
        mask = torch.where(q_global, kv_idx < length,
                           kv_global | (kv_idx >= length) | ((q_y - kv_y) ** 2 + (q_x - kv_x) ** 2 < self.radius ** 2))
        n_keys = length * (10 if d > 1 else 1)
        scale = math.sqrt(math.log(n_keys, 64 ** 2 + 512) / dim) if self.proportional else dim ** -0.5
        scores = (q.double() @ k.double().transpose(-1, -2)) * scale
        out = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v.double()
        return out.to(q.dtype).transpose(1, 2).reshape(q.shape[0], length, -1)


def hand_patched_flux(state: dict, ntk: float, attention: HandBuiltClear):
    """A fresh tiny Flux with the file's tensors written into its fused layers by hand (q, k, v
    are consecutive row blocks of ``img_attn.qkv`` and of ``linear1``), the RoPE base scaled, and
    :class:`HandBuiltClear` as its attention."""
    model = comfy_harness.tiny_flux_patcher(seed=0)
    net = model.model.diffusion_model
    with torch.no_grad():
        for prefix, blocks in (("transformer_blocks", net.double_blocks), ("single_transformer_blocks", net.single_blocks)):
            for i, block in enumerate(blocks):
                fused = block.img_attn.qkv if prefix == "transformer_blocks" else block.linear1
                for j, name in enumerate(("to_q", "to_k", "to_v")):
                    fused.weight[j * HIDDEN:(j + 1) * HIDDEN] = state[f"{prefix}.{i}.attn.{name}.weight"]
                    fused.bias[j * HIDDEN:(j + 1) * HIDDEN] = state[f"{prefix}.{i}.attn.{name}.bias"]
                if prefix == "transformer_blocks":
                    block.img_attn.proj.weight.copy_(state[f"{prefix}.{i}.attn.to_out.0.weight"])
                    block.img_attn.proj.bias.copy_(state[f"{prefix}.{i}.attn.to_out.0.bias"])
    net.pe_embedder.theta = CFG["theta"] * ntk
    model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = attention
    return model


def spatial_of(state: dict) -> dict:
    return {(("double" if key.startswith("transformer_blocks") else "single"), int(key.split(".")[1])):
            tensor.reshape(int(tensor.numel() ** 0.5), -1)
            for key, tensor in state.items() if key.endswith("spatial_weight")}


def test_a_fresh_node_takes_the_first_file_in_models_clear_and_the_high_resolution_recipe(pack_nodes, clear_dir):
    import folder_paths

    def offered():
        # What /object_info sends the frontend, which gives a fresh node the default.
        inputs = pack_nodes["UltraResClearPatch"].INPUT_TYPES()["required"]
        return inputs["clear_weights"][1], inputs["ntk_factor"][1]["default"], inputs["proportional_attention"][1]

    elsewhere = folder_paths.get_filename_list("clear")  # other folders registered for "clear"
    clear_spec, ntk, proportional = offered()
    assert clear_spec["options"] == elsewhere + ["none"] and clear_spec["default"] == (elsewhere + ["none"])[0]
    assert ntk == 10.0 and proportional["default"] is True  # the CLEAR authors' high-resolution recipe
    for name in ("clear_local_8_down_4.safetensors", "clear_local_16.safetensors"):
        write_file(clear_dir, name, comfy_harness.clear_released_state_dict(DEPTH, DEPTH_SINGLE, HIDDEN))
    clear_spec, _, _ = offered()
    files = folder_paths.get_filename_list("clear")
    assert clear_spec["options"] == files + ["none"] and clear_spec["default"] == files[0]
    assert {"clear_local_16.safetensors", "clear_local_8_down_4.safetensors"} <= set(files)


def test_a_window_larger_than_the_grid_gives_the_unpatched_output_and_says_so(pack_nodes, caplog):
    model = comfy_harness.tiny_flux_patcher(seed=0)
    expected = run(model)
    with caplog.at_level(logging.INFO):
        patched = patch(pack_nodes, model, radius=13)  # 13**2 > 6**2 + 9**2
        out = run(patched)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert caplog.text.count("covers the whole 7x10 token grid (160×112), so CLEAR steps aside and the model's own "
                             "attention runs here (exact)") == 1
    assert "CLEAR: active" not in caplog.text


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_clear_kernels_inside_the_model_give_the_unpatched_output_when_the_window_covers_the_grid(
        pack_nodes, monkeypatch, backend):
    # the node hands covering windows to the model's own attention (above); here the CLEAR path
    # runs anyway, through the token layout, the kernel (Triton interpreted) and the output reshape
    from ultrares.models.clear.attention import ClearAttention

    model = comfy_harness.tiny_flux_patcher(seed=0)
    expected = run(model)
    monkeypatch.setattr(ClearAttention, "is_plain_attention", lambda self, layout: False)
    out = run(patch(pack_nodes, model, radius=13, backend=backend))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, down, ntk, proportional, cfg, latent", [
    # odd latent sides (an img2img input cropped to multiples of 8 px): Flux pads them to 7 x 10 tokens
    ("clear_local_3.safetensors", 1, 1.0, False, 1.0, (1, 16, 13, 19)),
    ("clear_local_3_down_2.safetensors", 2, 10.0, True, 2.0, LATENT),  # cond + uncond: batch 2 per call
])
def test_the_patched_model_equals_a_hand_built_clear_forward_through_the_sampler(pack_nodes, clear_dir, name, down,
                                                                                 ntk, proportional, cfg, latent):
    state = comfy_harness.clear_released_state_dict(DEPTH, DEPTH_SINGLE, HIDDEN, down_factor=down, seed=5)
    write_file(clear_dir, name, state)
    patched = patch(pack_nodes, comfy_harness.tiny_flux_patcher(seed=0), name, ntk=ntk, proportional=proportional)
    reference = hand_patched_flux(state, ntk, HandBuiltClear(GRID, 3, down, spatial_of(state), proportional))
    out = run(patched, latent, cfg=cfg)
    torch.testing.assert_close(out, run(reference, latent, cfg=cfg), rtol=1e-4, atol=1e-4)
    # and it is not just the plain model
    assert (out - run(comfy_harness.tiny_flux_patcher(seed=0), latent, cfg=cfg)).abs().max() > 1e-2


def test_kontext_reference_tokens_are_global_like_text(pack_nodes, clear_dir):
    state = comfy_harness.clear_released_state_dict(DEPTH, DEPTH_SINGLE, HIDDEN, down_factor=2, seed=6)
    name = write_file(clear_dir, "clear_local_2_down_2.safetensors", state)
    reference_latents = [torch.randn(1, 16, 6, 8, generator=torch.Generator().manual_seed(1))]  # 3 x 4 tokens
    patched = patch(pack_nodes, comfy_harness.tiny_flux_patcher(seed=0), name)
    reference = hand_patched_flux(state, 1.0, HandBuiltClear(GRID, 2, 2, spatial_of(state), n_ref=12))
    out = run(patched, reference_latents=reference_latents)
    torch.testing.assert_close(out, run(reference, reference_latents=reference_latents), rtol=1e-4, atol=1e-4)
    assert (out - run(patched)).abs().max() > 1e-3  # the reference image does reach the image tokens


def test_the_original_model_is_unchanged_after_the_patched_one_ran(pack_nodes, clear_dir):
    name = write_file(clear_dir, "clear_local_2_down_2.safetensors",
                      comfy_harness.clear_released_state_dict(DEPTH, DEPTH_SINGLE, HIDDEN, down_factor=2))
    model = comfy_harness.tiny_flux_patcher(seed=0)
    before = run(model)
    weights = {k: v.clone() for k, v in model.model.state_dict().items()}
    patched = patch(pack_nodes, model, name, ntk=10.0, proportional=True)
    assert not torch.equal(run(patched), before)
    torch.testing.assert_close(run(model), before, rtol=0, atol=0)
    assert model.model.diffusion_model.pe_embedder.theta == CFG["theta"]
    for key, value in model.model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert "optimized_attention_override" not in model.model_options.get("transformer_options", {})


def test_lora_style_patches_add_on_top_of_the_clear_weights_in_either_node_order(pack_nodes, clear_dir):
    name = write_file(clear_dir, "clear_local_3.safetensors",
                      comfy_harness.clear_released_state_dict(DEPTH, DEPTH_SINGLE, HIDDEN))
    key = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    delta = {key: ("diff", (torch.randn(3 * HIDDEN, HIDDEN, generator=torch.Generator().manual_seed(2)) * 0.05,))}
    lora_first = comfy_harness.tiny_flux_patcher(seed=0).clone()
    lora_first.add_patches(delta)
    lora_first = patch(pack_nodes, lora_first, name)
    lora_last = patch(pack_nodes, comfy_harness.tiny_flux_patcher(seed=0), name).clone()
    lora_last.add_patches(delta)
    clear_only = patch(pack_nodes, comfy_harness.tiny_flux_patcher(seed=0), name)
    out = run(lora_first)
    torch.testing.assert_close(out, run(lora_last), rtol=0, atol=0)
    assert (out - run(clear_only)).abs().max() > 1e-3


def recording_override():
    """A previous attention override (e.g. another pack's) that counts its calls. A function, so
    that ``ModelPatcher.clone`` (which deep-copies the options) keeps this very counter."""
    calls = []

    def override(func, *args, **kwargs):
        calls.append(1)
        return func(*args, **kwargs)

    return override, calls


def test_small_images_and_foreign_calls_go_to_the_previous_override(pack_nodes, caplog):
    model = comfy_harness.tiny_flux_patcher(seed=0)
    previous, calls = recording_override()
    model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = previous
    expected = run(model)
    calls_per_run = len(calls)
    gated = patch(pack_nodes, model, radius=2, min_tokens=GRID[0] * GRID[1])
    with caplog.at_level(logging.INFO):
        torch.testing.assert_close(run(gated), expected, rtol=0, atol=0)
    assert len(calls) == 2 * calls_per_run
    # Said once for the whole run (every step and call of the sampler comes through), in pixels.
    assert caplog.text.count("CLEAR: steps aside at 160×112: 70 image tokens, not above the 70 set in 'Use CLEAR "
                             "above'; the model's own attention runs (CLEAR's weights still apply)") == 1
    caplog.clear()
    active = patch(pack_nodes, model, radius=2, down=2, ntk=10.0, proportional=True, min_tokens=GRID[0] * GRID[1] - 1)
    with caplog.at_level(logging.INFO):
        assert not torch.equal(run(active), expected)
    assert len(calls) == 2 * calls_per_run  # every call was the joint attention, none went through
    assert caplog.text.count("CLEAR: active at 160×112 (70 image tokens): each image token sees the tokens within 2 "
                             "tokens (32 px), plus a 2×2-token summary of the whole image, NTK ×10, proportional "
                             "attention") == 1
    assert "steps aside" not in caplog.text


def test_a_masked_attention_call_is_said_once_to_run_the_models_own_attention(pack_nodes, caplog):
    from ultrares.nodes.clear.hooks import LAYOUT_KEY, OVERRIDE_KEY, TokenLayout

    patched = patch(pack_nodes, comfy_harness.tiny_flux_patcher(seed=0), radius=2)
    override = patched.model_options["transformer_options"][OVERRIDE_KEY]
    q = torch.randn(1, HEADS, TEXT_TOKENS + 70, HIDDEN // HEADS)
    options = {LAYOUT_KEY: TokenLayout(GRID, 0)}
    dense = []
    with caplog.at_level(logging.INFO):
        for _ in range(2):
            override(lambda *args, **kwargs: dense.append(1) or q, q, q, q, HEADS, skip_reshape=True,
                     mask=torch.ones(1, 1, q.shape[2], q.shape[2], dtype=torch.bool), transformer_options=options)
    assert len(dense) == 2
    assert caplog.text.count("CLEAR: steps aside for an attention call with a mask: the model's own attention runs "
                             "for it") == 1


def test_block_entries_of_other_packs_keep_running_under_the_block_tags(pack_nodes, clear_dir):
    name = write_file(clear_dir, "clear_local_2_down_2.safetensors",
                      comfy_harness.clear_released_state_dict(DEPTH, DEPTH_SINGLE, HIDDEN, down_factor=2, seed=7))
    seen = []

    def other_pack(args, extra):
        seen.append(args["transformer_options"].get("ultrares_clear_block"))
        return extra["original_block"](args)

    plain = patch(pack_nodes, comfy_harness.tiny_flux_patcher(seed=0), name)
    model = comfy_harness.tiny_flux_patcher(seed=0)
    model.set_model_patch_replace(other_pack, "dit", "single_block", 1)
    out = run(patch(pack_nodes, model, name))
    assert seen and set(seen) == {("single", 1)}
    torch.testing.assert_close(out, run(plain), rtol=0, atol=0)


def test_newer_comfyui_block_keys_are_understood():
    from ultrares.nodes.clear.hooks import calling_block

    assert calling_block({"block_type": "single", "block_index": 3}) == ("single", 3)
    assert calling_block({"ultrares_clear_block": ("double", 1), "block_type": "single", "block_index": 3}) == ("double", 1)
    assert calling_block({}) is None


def test_bad_inputs_are_refused_with_the_reason(pack_nodes, clear_dir):
    write_file(clear_dir, "clear_local_8.safetensors", comfy_harness.clear_released_state_dict(DEPTH, DEPTH_SINGLE, HIDDEN))
    write_file(clear_dir, "clear_local_8_wide.safetensors",
               comfy_harness.clear_released_state_dict(DEPTH, DEPTH_SINGLE, 2 * HIDDEN))
    write_file(clear_dir, "clear_local_8_deep.safetensors",
               comfy_harness.clear_released_state_dict(DEPTH + 1, DEPTH_SINGLE, HIDDEN))
    write_file(clear_dir, "mystery.safetensors", comfy_harness.clear_released_state_dict(DEPTH, DEPTH_SINGLE, HIDDEN))
    flux = comfy_harness.tiny_flux_patcher(seed=0)
    with pytest.raises(ValueError, match="FLUX models only.*SD15"):
        patch(pack_nodes, comfy_harness.tiny_sd15_patcher(seed=0), "clear_local_8.safetensors")
    with pytest.raises(ValueError, match=r"CLEAR keys of another shape: transformer_blocks\.0\.attn\.to_q\.weight "
                                         r"\(128, 128\) \(expected \(64, 64\)\)"):
        patch(pack_nodes, flux, "clear_local_8_wide.safetensors")
    with pytest.raises(ValueError, match=r"unexpected CLEAR keys: transformer_blocks\.2\.attn\.to_k\.bias"):
        patch(pack_nodes, flux, "clear_local_8_deep.safetensors")
    with pytest.raises(ValueError, match="window radius.*mystery.safetensors.*set window_radius"):
        patch(pack_nodes, flux, "mystery.safetensors")
    with pytest.raises(ValueError, match="no CLEAR weights file is selected"):
        patch(pack_nodes, flux, "none")
    with pytest.raises(ValueError, match="already went through a CLEAR node"):
        patch(pack_nodes, patch(pack_nodes, flux, "clear_local_8.safetensors"), "clear_local_8.safetensors")


def test_metadata_and_overrides_choose_the_pattern(pack_nodes, clear_dir):
    state = comfy_harness.clear_released_state_dict(DEPTH, DEPTH_SINGLE, HIDDEN)
    name = write_file(clear_dir, "renamed.safetensors", state, metadata={"window_size": "3"})
    write_file(clear_dir, "clear_local_3.safetensors", state)
    flux = comfy_harness.tiny_flux_patcher(seed=0)
    from_metadata = run(patch(pack_nodes, flux, name))
    torch.testing.assert_close(from_metadata, run(patch(pack_nodes, flux, "clear_local_3.safetensors")), rtol=0, atol=0)
    torch.testing.assert_close(run(patch(pack_nodes, flux, name, radius=3)), from_metadata, rtol=0, atol=0)
    with pytest.raises(ValueError, match="renamed.safetensors holds CLEAR weights made for window_radius 3 \\(its "
                                         "metadata says so\\), but window_radius is set to 13"):
        patch(pack_nodes, flux, name, radius=13)


def count_attention_calls(model, latent_shape=LATENT) -> int:
    calls = []

    def counting(func, *args, **kwargs):
        calls.append(1)
        return func(*args, **kwargs)

    counted = model.clone()
    counted.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = counting
    run(counted, latent_shape)
    return len(calls)


def prepare_state_passes_model_options() -> bool:
    import comfy.model_patcher

    return "model_options" in inspect.signature(comfy.model_patcher.ModelPatcher.prepare_state).parameters


def sparse_attention_node(model, min_tokens: int = 0):
    """Stand-in for core's Model Sparse Attention node applied to ``model``
    (comfy_extras/nodes_sparse_attention.py, Comfy-Org/ComfyUI 01dafad3; 0.3.64 has no such node).

    Like ``install_override`` there, it puts its override on top of the current one, chaining to
    it, when the node runs and again at every sampling step (newer ComfyUI: an ON_PREPARE_STATE
    callback, which gets the run's model options; 0.3.64's prepare_state passes none, so a
    CALC_COND_BATCH wrapper does it at the same point of each step), and leaves the slot alone
    once it is on top. Its override runs its own attention (ComfyUI's, recorded as "own") on
    calls of ``min_tokens`` tokens or more and hands shorter ones to the previous override.
    Its functions carry the core module's name, as the real node's do.
    """
    import comfy.patcher_extension

    seen: list[tuple[str, int]] = []
    installed = set()

    def make_override(previous):
        def override(func, q, k, v, heads, **kwargs):
            tokens = q.shape[2] if kwargs.get("skip_reshape") else q.shape[1]
            if tokens >= min_tokens:
                seen.append(("own", tokens))
                return func(q, k, v, heads, **kwargs)
            seen.append(("passed", tokens))
            return func(q, k, v, heads, **kwargs) if previous is None else previous(func, q, k, v, heads, **kwargs)
        override.__module__ = "comfy_extras.nodes_sparse_attention"
        return override

    def install(transformer_options):
        current = transformer_options.get("optimized_attention_override")
        if current in installed:
            return
        override = make_override(current)
        installed.add(override)
        transformer_options["optimized_attention_override"] = override

    patched = model.clone()
    install(patched.model_options["transformer_options"])
    if prepare_state_passes_model_options():
        patched.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_PREPARE_STATE, "standin_sparse",
                                      lambda patcher, timestep, model_options: install(
                                          model_options["transformer_options"]))
    else:
        def every_step(executor, model, conds, x_in, timestep, model_options):
            install(model_options["transformer_options"])
            return executor(model, conds, x_in, timestep, model_options)

        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "standin_sparse", every_step)
    return patched, seen


SMALL_LATENT = (1, 16, 8, 8)  # 4 x 4 = 16 image tokens


def test_clear_keeps_the_image_calls_under_an_override_reinstalled_at_every_step(pack_nodes, caplog):
    model = comfy_harness.tiny_flux_patcher(seed=0)
    clear = patch(pack_nodes, model, radius=2, min_tokens=40)  # CLEAR on the 7 x 10 grid, not on 4 x 4
    clear_alone = run(clear)
    plain_small = run(model, SMALL_LATENT)
    later, seen = sparse_attention_node(clear)
    with caplog.at_level(logging.INFO):
        out = run(later)
    torch.testing.assert_close(out, clear_alone, rtol=0, atol=0)
    assert seen == [], "every call of the large image was CLEAR's"
    torch.testing.assert_close(run(later, SMALL_LATENT), plain_small, rtol=0, atol=0)
    assert [who for who, _ in seen] == ["own"] * count_attention_calls(model, SMALL_LATENT)
    assert caplog.text.count("the attention override slot held core's Model Sparse Attention node") == 1
    # the graph without CLEAR on top: the other override's own attention, not CLEAR's
    assert not torch.equal(run(sparse_attention_node(model)[0]), clear_alone)


def test_clear_applied_after_the_sparse_node_keeps_the_image_calls_too(pack_nodes):
    # CLEAR chains to the sparse override at patch time; that node then puts a new override on
    # top of CLEAR's at every step, and CLEAR goes back on top of it.
    model = comfy_harness.tiny_flux_patcher(seed=0)
    clear_alone = run(patch(pack_nodes, model, radius=2, min_tokens=40))
    earlier, seen = sparse_attention_node(model)
    torch.testing.assert_close(run(patch(pack_nodes, earlier, radius=2, min_tokens=40)), clear_alone, rtol=0, atol=0)
    assert seen == []


def test_calls_clear_declines_reach_the_override_it_displaced_and_the_chain_below(pack_nodes):
    model = comfy_harness.tiny_flux_patcher(seed=0)
    clear = patch(pack_nodes, model, radius=2, min_tokens=40)
    later, seen = sparse_attention_node(clear, min_tokens=10 ** 6)  # hands every call down
    torch.testing.assert_close(run(later, SMALL_LATENT), run(model, SMALL_LATENT), rtol=0, atol=0)
    assert [who for who, _ in seen] == ["passed"] * count_attention_calls(model, SMALL_LATENT)


def set_model_optimized_attention(model, attention):
    """``ModelPatcher.set_model_optimized_attention`` where the host has it (newer ComfyUI's Model
    Attention Backend node calls it); a copy of its body otherwise (comfy/model_patcher.py,
    Comfy-Org/ComfyUI 08d0e510): the slot gets a closure that runs ``attention`` and ignores the
    backend ComfyUI chose."""
    setter = getattr(model, "set_model_optimized_attention", None)
    if setter is not None:
        return setter(attention)

    def optimized_attention_override(_, *args, **kwargs):
        return attention(*args, **kwargs)

    optimized_attention_override.__qualname__ = ("ModelPatcher.set_model_optimized_attention.<locals>."
                                                 "optimized_attention_override")
    model.model_options["transformer_options"]["optimized_attention_override"] = optimized_attention_override


def test_an_attention_backend_node_after_clear_becomes_its_dense_fallback_and_is_named(pack_nodes, caplog):
    import comfy.ldm.modules.attention as comfy_attention

    model = comfy_harness.tiny_flux_patcher(seed=0)
    clear = patch(pack_nodes, model, radius=2, min_tokens=40)
    clear_alone = run(clear)
    backend_calls = []

    def attention_pytorch(*args, **kwargs):
        backend_calls.append(1)
        return comfy_attention.attention_pytorch(*args, **kwargs)

    with_backend = clear.clone()
    set_model_optimized_attention(with_backend, attention_pytorch)
    backend_only = model.clone()
    set_model_optimized_attention(backend_only, attention_pytorch)
    with caplog.at_level(logging.INFO):
        torch.testing.assert_close(run(with_backend), clear_alone, rtol=0, atol=0)
    assert backend_calls == []
    assert caplog.text.count("an attention backend set through ModelPatcher.set_model_optimized_attention") == 1
    assert "(attention_pytorch)" in caplog.text
    torch.testing.assert_close(run(with_backend, SMALL_LATENT), run(backend_only, SMALL_LATENT), rtol=0, atol=0)
    assert len(backend_calls) == 2 * count_attention_calls(model, SMALL_LATENT)


def test_the_override_is_tagged_memory_efficient_for_core_memory_estimates(pack_nodes):
    override = patch(pack_nodes, comfy_harness.tiny_flux_patcher(seed=0), radius=2).model_options[
        "transformer_options"]["optimized_attention_override"]
    assert override.memory_efficient is True


def test_overrides_are_described_by_the_node_that_installed_them(pack_nodes):
    from ultrares.nodes.clear.override_slot import describe_override

    def sparse(func, *args, **kwargs):
        return func(*args, **kwargs)

    for module in ("comfy_extras.nodes_sparse_attention", r"D:\ComfyUI\comfy_extras\nodes_sparse_attention"):
        sparse.__module__ = module  # how ComfyUI names a module it loads by path
        assert describe_override(sparse).startswith("core's Model Sparse Attention node")

    def other_pack(func, *args, **kwargs):
        return func(*args, **kwargs)

    other_pack.__module__ = "custom_nodes.KJNodes.nodes"
    assert describe_override(other_pack) == ("another node's attention override (custom_nodes.KJNodes.nodes."
                                             "test_overrides_are_described_by_the_node_that_installed_them.<locals>."
                                             "other_pack)")
    assert describe_override(None).startswith("no override")


def flux_variant_standin(image_model: str, family: str, **params):
    """A tiny FLUX.1 dressed as another Flux-class variant the way newer ComfyUI builds one
    (0.3.64 has none): its model_detection.py gives the variant its own ``image_model`` (Flux.2
    also ``global_modulation``, ``mlp_silu_act``, no biases, ``txt_ids_dims=[3]``, 4 RoPE axes),
    supported_models.py its own model config class, and the same comfy.ldm.flux.model.Flux class
    takes the extra fields in its FluxParams (newer copies of model.py and model_detection.py of
    unknown origin: no Comfy-Org/ComfyUI copy of those two files newer than 0.3.64 could be had)."""
    model = comfy_harness.tiny_flux_patcher(seed=0)
    config = model.model.model_config
    config.unet_config = {**config.unet_config, "image_model": image_model}
    config.__class__ = type(family, (type(config),), {})
    network = model.model.diffusion_model
    network.params = types.SimpleNamespace(**{**dataclasses.asdict(network.params), **params})
    return model


def test_flux_class_variants_whose_layout_clear_does_not_fit_are_refused_by_name(pack_nodes, clear_dir):
    write_file(clear_dir, "clear_local_8.safetensors", comfy_harness.clear_released_state_dict(DEPTH, DEPTH_SINGLE, HIDDEN))
    flux2 = flux_variant_standin("flux2", "Flux2", global_modulation=True, mlp_silu_act=True, qkv_bias=False,
                                 ops_bias=False, txt_ids_dims=[3], axes_dim=[8, 8, 8, 8])
    chroma = flux_variant_standin("chroma", "Chroma")
    for weights in ("clear_local_8.safetensors", "none"):
        with pytest.raises(ValueError, match=r"FLUX\.1's block layout only .* this Flux2 model has another "
                                             r"\(image_model 'flux2', global_modulation=True, mlp_silu_act=True, "
                                             r"ops_bias=False, qkv_bias=False, txt_ids_dims=\[3\], 4 RoPE axes\)"):
            patch(pack_nodes, flux2, weights, radius=8)
        with pytest.raises(ValueError, match=r"this Chroma model has another \(image_model 'chroma'\).*not supported yet"):
            patch(pack_nodes, chroma, weights, radius=8)
    assert patch(pack_nodes, comfy_harness.tiny_flux_patcher(seed=0), "clear_local_8.safetensors") is not None


def test_a_clone_of_the_patched_model_runs_the_same_clear_and_names_no_other_override(pack_nodes, caplog):
    # Every node after CLEAR clones the model (a LoRA, a sampler's patches), and a clone deep-copies
    # the model options: the override there must stay the one CLEAR's wrapper put in.
    clear = patch(pack_nodes, comfy_harness.tiny_flux_patcher(seed=0), radius=2)
    clone = clear.clone()
    override = clone.model_options["transformer_options"]["optimized_attention_override"]
    assert override is clear.model_options["transformer_options"]["optimized_attention_override"]
    with caplog.at_level(logging.INFO):
        torch.testing.assert_close(run(clone), run(clear), rtol=0, atol=0)
    assert "the attention override slot held" not in caplog.text
