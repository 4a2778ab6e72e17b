"""CLEAR on several devices (nodes/clear/devices.py) on ComfyUI's tiny Flux, CPU devices: the
node's stripe-parallel model samples exactly what the one-device CLEAR model samples (2 and 3
threads; gloo process groups of 2 and 3 ranks), with down-sampled keys, odd grids, stripes
thinner than the window, batch 2, cfg, Kontext reference tokens; its copies follow patches added
after it; the input model is left as it was; bad device lists, too small images and cancel
behave."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import save_file

import comfy_harness
from gloo_ranks import run_ranks

CFG = comfy_harness.TINY_FLUX_CONFIG
DEPTH, DEPTH_SINGLE, HIDDEN = CFG["depth"], CFG["depth_single_blocks"], CFG["hidden_size"]
LATENT = (1, 16, 14, 20)  # 7 x 10 tokens

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def clear(pack_nodes, model=None, weights="none", radius=3, down=0, proportional=False):
    model = model if model is not None else comfy_harness.tiny_flux_patcher(seed=0)
    (patched,) = pack_nodes["UltraResClearPatch"].execute(model, weights, radius, down, 1.0, proportional, 0,
                                                          "auto").result
    return patched


def split(pack_nodes, model, devices: str):
    (out,) = pack_nodes["UltraResClearDevices"].execute(model, devices).result
    return out


def run(model, latent=LATENT, cfg=1.0, reference_latents=None) -> torch.Tensor:
    cond = comfy_harness.flux_conditioning(batch=latent[0], tokens=7)
    uncond = comfy_harness.flux_conditioning(batch=latent[0], tokens=7, seed=1)
    if reference_latents is not None:
        cond[0][1]["reference_latents"] = reference_latents
    return comfy_harness.sample(model, cond, uncond, torch.zeros(latent), seed=3, cfg=cfg)


def relative(out: torch.Tensor, expected: torch.Tensor) -> float:
    return float((out - expected).abs().max() / expected.abs().max())


def down_sampled_file(clear_dir) -> str:
    name = "clear_local_3_down_2.safetensors"  # made for the radius clear() asks for
    save_file(comfy_harness.clear_released_state_dict(DEPTH, DEPTH_SINGLE, HIDDEN, down_factor=2, seed=4),
              str(clear_dir / name))
    return name


@pytest.mark.parametrize("devices", ["cpu,cpu", "cpu,cpu,cpu"])
@pytest.mark.parametrize("radius, latent, cfg", [
    (3, LATENT, 1.0),
    (5, (1, 16, 13, 19), 1.0),  # odd latent (7 x 10 tokens); 3 devices: stripes of 2-3 rows, thinner than the reach 4
    (3, (2, 16, 14, 20), 3.0),  # batch 2 with cfg: cond and uncond in one call of 4
])
def test_the_split_model_samples_what_one_device_samples(pack_nodes, devices, radius, latent, cfg):
    model = clear(pack_nodes, radius=radius)
    expected = run(model, latent, cfg)
    assert relative(run(split(pack_nodes, model, devices), latent, cfg), expected) <= 1e-5


@pytest.mark.parametrize("devices", ["cpu,cpu", "cpu,cpu,cpu"])
def test_down_sampled_keys_with_their_per_layer_weights_split_exactly(pack_nodes, clear_dir, devices, caplog):
    model = clear(pack_nodes, weights=down_sampled_file(clear_dir), proportional=True)
    expected = run(model, cfg=2.0)
    with caplog.at_level("INFO"):
        assert relative(run(split(pack_nodes, model, devices), cfg=2.0), expected) <= 1e-5
    # Said once per run, with the stripes: whole 2x2 cells (the odd last row goes with the last stripe).
    rows = {"cpu,cpu": "4, 3", "cpu,cpu,cpu": "2, 2, 3"}[devices]
    count = len(devices.split(","))
    assert caplog.text.count(f"CLEAR on several GPUs: 160×112 split into {count} stripes of {rows} token rows, one "
                             "per device") == 1


def test_kontext_reference_tokens_stay_on_every_device(pack_nodes, clear_dir):
    model = clear(pack_nodes, weights=down_sampled_file(clear_dir))
    references = [torch.randn(1, 16, 6, 8, generator=torch.Generator().manual_seed(1))]
    expected = run(model, reference_latents=references)
    assert relative(run(split(pack_nodes, model, "cpu,cpu,cpu"), reference_latents=references), expected) <= 1e-5
    assert relative(run(model), expected) > 1e-3  # the reference image matters


def with_control_residuals(model):
    """A clone fed ControlNet-style residuals (one per double block, one for the first single
    block, for every image token), as ComfyUI's ControlNet hands Flux its ``control``."""
    import comfy.patcher_extension

    patched = model.clone()

    def add_control(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kw):
        g = torch.Generator().manual_seed(5)
        tokens = -(-x.shape[-2] // 2) * -(-x.shape[-1] // 2)
        def residual() -> torch.Tensor:
            return torch.randn(x.shape[0], tokens, HIDDEN, generator=g) * 0.2

        control = {"input": [residual(), None], "output": [residual()]}
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)

    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_control", add_control)
    return patched


def test_controlnet_residuals_are_cut_into_the_stripes(pack_nodes):
    model = clear(pack_nodes)
    expected = run(with_control_residuals(model))
    assert relative(expected, run(model)) > 1e-3
    assert relative(run(with_control_residuals(split(pack_nodes, model, "cpu,cpu,cpu"))), expected) <= 1e-5


def test_gloo_process_groups_of_2_and_3_ranks_sample_what_one_device_samples(comfyui_path):
    from clear_flux_ranks import CASES

    by_rank = run_ranks("clear_flux_ranks:sample_on_rank", 3, str(comfyui_path), timeout=300)
    for size in (2, 3):
        errors = [e[size] for e in by_rank if size in e]
        assert len(errors) == size and all(len(e) == len(CASES) for e in errors)
        assert max(max(e) for e in errors) <= 1e-5, errors


def test_one_device_is_the_model_as_it_is(pack_nodes):
    model = clear(pack_nodes)
    single = split(pack_nodes, model, "cpu")
    assert single is not model and single.object_patches == model.object_patches
    torch.testing.assert_close(run(single), run(model), rtol=0, atol=0)


def test_the_copies_get_patches_added_after_the_node_and_the_input_model_is_left_alone(pack_nodes):
    from ultrares.nodes.clear.devices import DEVICES_KEY

    model = clear(pack_nodes)
    before = run(model)
    weights = {k: v.clone() for k, v in model.model.state_dict().items()}
    options = repr(model.model_options)
    key = "diffusion_model.single_blocks.1.linear1.weight"
    delta = {key: ("diff", (torch.randn(weights[key].shape, generator=torch.Generator().manual_seed(2)) * 0.05,))}
    lora = split(pack_nodes, model, "cpu,cpu,cpu").clone()  # a LoRA loader after the node
    lora.add_patches(delta)
    reference = model.clone()
    reference.add_patches(delta)
    out = run(lora)
    assert relative(out, run(reference)) <= 1e-5 and relative(out, before) > 1e-3
    copies = lora.get_additional_models_with_key(DEVICES_KEY)
    assert len(copies) == 2 and all(c.model is not model.model for c in copies)
    # on 0.3.64 a copy's unpatched weights are the original's CPU tensors, in parameters of its own
    original = model.model.diffusion_model.img_in.weight
    for c in copies:
        own = c.model.diffusion_model.img_in.weight
        assert own is not original and own.data_ptr() == original.data_ptr()
        assert "forward_orig" not in c.model.diffusion_model.__dict__  # copies run the class's method
    # the input model samples as before, with its weights, options and module as they were
    torch.testing.assert_close(run(model), before, rtol=0, atol=0)
    assert all(torch.equal(v, weights[k]) for k, v in model.model.state_dict().items())
    assert repr(model.model_options) == options and not model.get_additional_models_with_key(DEVICES_KEY)


@pytest.mark.parametrize("devices, message", [
    ("cpu,nowhere", "'nowhere' is not a device name"),
    ("cpu,cuda:3", "cuda:3 does not exist here"),
    ("cuda:0,cpu", "list the device ComfyUI samples this model on first"),
])
def test_bad_device_lists_are_refused_with_the_reason(pack_nodes, devices, message):
    with pytest.raises((ValueError, RuntimeError), match=message):
        split(pack_nodes, clear(pack_nodes), devices)


def test_a_model_without_clear_or_split_twice_is_refused(pack_nodes):
    with pytest.raises(ValueError, match="needs a model patched by the CLEAR attention"):
        split(pack_nodes, comfy_harness.tiny_flux_patcher(seed=0), "cpu,cpu")
    with pytest.raises(ValueError, match="already split over devices"):
        split(pack_nodes, split(pack_nodes, clear(pack_nodes), "cpu,cpu"), "cpu,cpu")


def test_an_image_with_fewer_token_rows_than_devices_is_refused_when_sampled(pack_nodes):
    with pytest.raises(ValueError, match="2 token rows, 2 rows, too few for 3 devices"):
        run(split(pack_nodes, clear(pack_nodes), "cpu,cpu,cpu"), latent=(1, 16, 4, 20))


def test_cancel_stops_every_device(pack_nodes):
    import comfy.model_management

    model = split(pack_nodes, clear(pack_nodes), "cpu,cpu,cpu")
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run(model)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert not [t for t in threading.enumerate() if t.name.startswith("clear-device-")]
    assert relative(run(model), run(clear(pack_nodes))) <= 1e-5  # and the next run is whole again
