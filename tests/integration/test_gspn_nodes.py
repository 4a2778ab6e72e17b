"""GSPN nodes on ComfyUI's real SD1.5 classes (tiny UNet, CPU): distil weights, load them into
the patch node, sample through ComfyUI's KSampler."""

from __future__ import annotations

import pytest
import torch

import comfy_harness
from gspn_standin import held_out_loss

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

HELD_OUT_SEED = 500


@pytest.fixture
def gspn_folder(only_model_folder):
    """models/gspn is an empty folder of this test only."""
    return only_model_folder("gspn")


def _prompts(batch=1):
    """Two prompts joined as two entries of one CONDITIONING (Conditioning (Combine))."""
    return comfy_harness.sd15_conditioning(batch, seed=1) + comfy_harness.sd15_conditioning(batch, seed=2)


def _distill(pack_nodes, model, name, steps, **overrides):
    args = dict(model=model, positive=_prompts(), output_name=name, steps=steps, learning_rate=1e-2, width=64,
                height=48, batch_size=1, sampling_steps=4, cfg=1.0, prediction_weight=0.0, chunk=4, proxy_ratio=4,
                seed=0, resume=False, save_every=0)
    args.update(overrides)
    return pack_nodes["UltraResGSPNDistill"].execute(**args)


def _attn1_patches(model):
    return model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})


def test_distilled_weights_match_attn1_far_better_than_random_ones_and_sample_end_to_end(pack_nodes, gspn_folder):
    from ultrares.models.gspn import GSPNConfig, GSPNLayers, load_gspn_weights
    from ultrares.nodes.gspn.patch import unet_layers
    from ultrares.nodes.gspn.distillation import TrajectorySettings, with_host

    def evaluate_gspn(model, positive, negative, gspn, trajectory, points, seed):
        with torch.inference_mode(False):
            return with_host(model, positive, negative, trajectory, seed,
                             lambda host: held_out_loss(gspn, host, points, seed))

    model = comfy_harness.tiny_sd15_patcher(seed=1)
    trajectory = TrajectorySettings(width=64, height=48, sampling_steps=4, cfg=1.0)
    torch.manual_seed(0)
    random_gspn = GSPNLayers(unet_layers(model), GSPNConfig(chunk=4, proxy_ratio=4))
    random_loss = evaluate_gspn(model, _prompts(), None, random_gspn, trajectory, points=4, seed=HELD_OUT_SEED)

    patched, plot = _distill(pack_nodes, model, "tiny_sd15", steps=40).result
    trained, record = load_gspn_weights(gspn_folder / "tiny_sd15.safetensors", "SD15", unet_layers(model))
    trained_loss = evaluate_gspn(model, _prompts(), None, trained, trajectory, points=4, seed=HELD_OUT_SEED)
    assert trained_loss < 0.5 * random_loss, (random_loss, trained_loss)
    assert record.steps == 40 and record.finished
    assert plot.shape == (1, 360 + 2 * 16, 640, 3) and 0 <= plot.min() and plot.max() <= 1  # two lines of notes

    (reloaded,) = pack_nodes["UltraResGSPNPatch"].execute(model, "tiny_sd15.safetensors", 0, "", 0).result
    cond = comfy_harness.sd15_conditioning(batch=2)
    latent = torch.zeros(2, 4, 6, 10)
    with torch.inference_mode():  # as ComfyUI runs nodes
        plain = comfy_harness.sample(model, cond, cond, latent, steps=3, seed=4, cfg=2.0)
        gspn_out = comfy_harness.sample(reloaded, cond, cond, latent, steps=3, seed=4, cfg=2.0)
        distill_out = comfy_harness.sample(patched, cond, cond, latent, steps=3, seed=4, cfg=2.0)
    assert torch.isfinite(gspn_out).all() and not torch.equal(gspn_out, plain)
    torch.testing.assert_close(distill_out, gspn_out)


def test_patch_replaces_every_attn1_on_a_clone_and_manages_the_gspn_modules(pack_nodes, gspn_folder):
    from ultrares.models.gspn import GSPNConfig, GSPNLayers, TrainingRecord, save_gspn_weights
    from ultrares.nodes.gspn.patch import ADDITIONAL_MODELS_KEY, unet_layers

    model = comfy_harness.tiny_sd15_patcher(seed=1)
    specs = unet_layers(model)
    save_gspn_weights(gspn_folder / "random.safetensors", GSPNLayers(specs, GSPNConfig()), "SD15", TrainingRecord())
    patch = pack_nodes["UltraResGSPNPatch"]
    (patched,) = patch.execute(model, "random.safetensors", 0, "", 0).result
    assert set(_attn1_patches(patched)) == {s.block for s in specs} and len(specs) == 7
    assert _attn1_patches(model) == {}, "the input model must stay unpatched"
    (gspn_patcher,) = patched.get_additional_models_with_key(ADDITIONAL_MODELS_KEY)
    assert sum(p.numel() for p in gspn_patcher.model.parameters()) > 0

    (some_kept,) = patch.execute(model, "random.safetensors", 1, "input.1.0", 0).result
    assert set(_attn1_patches(some_kept)) == {("output", 2, 0), ("output", 3, 0)}

    cond = comfy_harness.sd15_conditioning()
    latent = torch.zeros(1, 4, 6, 8)
    plain = comfy_harness.sample(model, cond, cond, latent, seed=3)
    (all_kept,) = patch.execute(model, "random.safetensors", 0, ", ".join(".".join(map(str, s.block)) for s in specs),
                                0).result
    (too_small,) = patch.execute(model, "random.safetensors", 0, "", 8 * 8 + 8).result
    for same in (all_kept, too_small):
        torch.testing.assert_close(comfy_harness.sample(same, cond, cond, latent, seed=3), plain, rtol=0, atol=0)
    (large_enough,) = patch.execute(model, "random.safetensors", 0, "", 8 * 6).result
    assert not torch.equal(comfy_harness.sample(large_enough, cond, cond, latent, seed=3), plain)


def test_layers_where_gspn_steps_aside_run_the_patches_other_packs_set(pack_nodes, gspn_folder):
    import comfy.ldm.modules.attention as comfy_attention
    from ultrares.models.gspn import GSPNConfig, GSPNLayers, TrainingRecord, save_gspn_weights
    from ultrares.nodes.gspn.patch import unet_layers

    model = comfy_harness.tiny_sd15_patcher(seed=1)
    specs = unet_layers(model)
    save_gspn_weights(gspn_folder / "random.safetensors", GSPNLayers(specs, GSPNConfig()), "SD15", TrainingRecord())
    calls = {"replace": 0, "override": 0}

    def other_replace(q, k, v, extra_options):  # e.g. another pack's attn1 patch on one layer
        calls["replace"] += 1
        return 0.5 * comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"])

    def other_override(func, *args, **kwargs):  # e.g. a sage/flash attention patch node
        calls["override"] += 1
        return func(*args, **kwargs)

    other = model.clone()
    other.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = other_override
    other.set_model_attn1_replace(other_replace, *specs[0].block)
    cond = comfy_harness.sd15_conditioning()
    latent = torch.zeros(1, 4, 6, 8)
    plain = comfy_harness.sample(other, cond, cond, latent, seed=3)
    plain_calls = dict(calls)
    assert plain_calls["replace"] > 0 and plain_calls["override"] > 0
    patch = pack_nodes["UltraResGSPNPatch"]
    kept = ", ".join(".".join(map(str, s.block)) for s in specs)
    for keep_layers, min_resolution in ((kept, 0), ("", 8 * 8 + 8)):
        calls.update(replace=0, override=0)
        (patched,) = patch.execute(other, "random.safetensors", 0, keep_layers, min_resolution).result
        torch.testing.assert_close(comfy_harness.sample(patched, cond, cond, latent, seed=3), plain, rtol=0, atol=0)
        assert calls == plain_calls, (keep_layers, min_resolution)


def test_sdxl_shaped_unet_is_distilled_and_patched_at_every_transformer_block_index(pack_nodes, gspn_folder):
    from ultrares.models.gspn import load_gspn_weights
    from ultrares.nodes.gspn.patch import layer_label, unet_layers

    model = comfy_harness.tiny_sdxl_patcher(seed=1)
    specs = unet_layers(model)
    assert len(specs) == 8 and {("input", 3, 1), ("middle", 0, 1), ("output", 1, 1)} <= {s.block for s in specs}
    positive = comfy_harness.sdxl_conditioning(seed=1) + comfy_harness.sdxl_conditioning(seed=2)
    _distill(pack_nodes, model, "tiny_sdxl", steps=2, positive=positive, cfg=2.0, proxy_ratio=0)
    gspn, record = load_gspn_weights(gspn_folder / "tiny_sdxl.safetensors", "SDXL", specs)
    assert record.steps == 2 and gspn.config.proxy_ratio == 32, "0 = the paper's proxy ratio for SDXL"
    patch = pack_nodes["UltraResGSPNPatch"]
    with pytest.raises(ValueError, match="distilled for a SDXL model, but this model is SD15"):
        patch.execute(comfy_harness.tiny_sd15_patcher(), "tiny_sdxl.safetensors", 0, "", 0)

    (patched,) = patch.execute(model, "tiny_sdxl.safetensors", 0, "", 0).result
    assert set(_attn1_patches(patched)) == {s.block for s in specs}
    all_but_one = ", ".join(layer_label(s) for s in specs if s.block != ("input", 3, 1))
    (second_block_only,) = patch.execute(model, "tiny_sdxl.safetensors", 0, all_but_one, 0).result
    assert set(_attn1_patches(second_block_only)) == {("input", 3, 1)}
    cond = comfy_harness.sdxl_conditioning()
    latent = torch.zeros(1, 4, 6, 8)
    plain = comfy_harness.sample(model, cond, cond, latent, seed=3)
    for gspn_model in (patched, second_block_only):
        out = comfy_harness.sample(gspn_model, cond, cond, latent, seed=3)
        assert torch.isfinite(out).all() and not torch.equal(out, plain)


def test_patch_refuses_weights_for_another_family_and_models_without_a_unet(pack_nodes, gspn_folder):
    from ultrares.models.gspn import GSPNConfig, GSPNLayers, TrainingRecord, save_gspn_weights
    from ultrares.nodes.gspn.patch import unet_layers

    model = comfy_harness.tiny_sd15_patcher()
    save_gspn_weights(gspn_folder / "xl.safetensors", GSPNLayers(unet_layers(model), GSPNConfig()), "SDXL",
                      TrainingRecord())
    patch = pack_nodes["UltraResGSPNPatch"]
    with pytest.raises(ValueError, match="distilled for a SDXL model, but this model is SD15"):
        patch.execute(model, "xl.safetensors", 0, "", 0)
    with pytest.raises(ValueError, match="GSPN needs an SD1.5/SDXL-style UNet, but this Flux model"):
        patch.execute(comfy_harness.tiny_flux_patcher(), "xl.safetensors", 0, "", 0)
    save_gspn_weights(gspn_folder / "sd15.safetensors", GSPNLayers(unet_layers(model), GSPNConfig()), "SD15",
                      TrainingRecord())
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \['middle.9.9'\] .* layers are input.1.0, "):
        patch.execute(model, "sd15.safetensors", 0, "middle.9.9", 0)


class InterruptStandIn(BaseException):
    """Newer ComfyUI's ``InterruptProcessingException`` derives from ``BaseException``
    (comfy/model_management.py, Comfy-Org/ComfyUI 02b2b388), so ``except Exception`` no longer
    sees a cancel; 0.3.64's derives from ``Exception``."""


@pytest.fixture(params=["host's", "BaseException"])
def interrupt_class(request) -> type[BaseException]:
    import comfy.model_management

    return comfy.model_management.InterruptProcessingException if request.param == "host's" else InterruptStandIn


def test_cancelled_distillation_leaves_a_checkpoint_that_resumes(pack_nodes, gspn_folder, monkeypatch, caplog,
                                                                 interrupt_class):
    import folder_paths
    from ultrares.models.gspn import load_gspn_weights

    model = comfy_harness.tiny_sd15_patcher(seed=2)
    checks = []

    def cancel_after_three():
        checks.append(1)
        if len(checks) > 3:
            raise interrupt_class()

    import ultrares.nodes.gspn.nodes as gspn_nodes

    never_cancelled = gspn_nodes.check_interrupt
    monkeypatch.setattr(gspn_nodes, "check_interrupt", cancel_after_three)
    with caplog.at_level("INFO"), pytest.raises(interrupt_class):
        _distill(pack_nodes, model, "cancelled", steps=10)
    _, record = load_gspn_weights(gspn_folder / "cancelled.safetensors", "SD15")
    assert record.steps == 3 and not record.finished
    path = gspn_folder / "cancelled.safetensors"
    # The log says what was trained, where it was saved and how to go on.
    assert f"GSPN Distill: saved step 3 to {path}" in caplog.text
    assert (f"GSPN Distill: cancelled after 3 of 10 steps: the weights so far (step 3) are saved in {path}; turn on "
            "resume to continue training them") in caplog.text
    assert __import__("re").search(r"GSPN Distill: step 2/10 \(step 2 of the file\): loss [\d.e-]+ \(mean of the "
                                   r"last 2: [\d.e-]+\)", caplog.text)
    assert (gspn_folder / "cancelled.safetensors.optimizer").is_file()
    assert folder_paths.get_filename_list("gspn") == ["cancelled.safetensors"], "the optimizer state is not listed"

    monkeypatch.setattr(gspn_nodes, "check_interrupt", never_cancelled)
    with pytest.raises(FileExistsError, match="turn on resume"):
        _distill(pack_nodes, model, "cancelled", steps=2)
    with caplog.at_level("INFO"):
        _distill(pack_nodes, model, "cancelled", steps=2, resume=True)
    _, record = load_gspn_weights(gspn_folder / "cancelled.safetensors", "SD15")
    assert record.steps == 5 and record.finished and len(record.layer_losses) == 5
    assert f"GSPN Distill: finished 2 steps (5 in the file): loss {record.layer_losses[-1]:.4g}" in caplog.text
    assert "starts afresh" not in caplog.text, "the saved optimizer state must be restored"

    (gspn_folder / "cancelled.safetensors.optimizer").unlink()
    _distill(pack_nodes, model, "cancelled", steps=1, resume=True)
    assert "no optimizer state saved with cancelled.safetensors at step 5" in caplog.text


def test_the_distill_node_shows_its_losses_and_where_it_saves_under_the_node_and_on_the_loss_curve(
        pack_nodes, gspn_folder):
    import re

    from comfy_api.latest import io

    received = {}
    prompt = {"1": {"class_type": "UltraResTestModel", "inputs": {}},
              "2": {"class_type": "UltraResTestPrompts", "inputs": {}},
              "3": {"class_type": "UltraResGSPNDistill", "inputs": dict(
                  model=["1", 0], positive=["2", 0], output_name="shown", steps=4, learning_rate=1e-2, width=64,
                  height=64, batch_size=1, sampling_steps=4, cfg=1.0, prediction_weight=0.0, chunk=4, proxy_ratio=4,
                  seed=0, resume=False, save_every=2)},
              "4": {"class_type": "UltraResTestSink", "inputs": {"value": ["3", 1]}}}
    nodes = {"UltraResTestModel": comfy_harness.source_node("UltraResTestModel", io.Model,
                                                            comfy_harness.tiny_sd15_patcher(seed=2)),
             "UltraResTestPrompts": comfy_harness.source_node("UltraResTestPrompts", io.Conditioning, _prompts()),
             "UltraResTestSink": comfy_harness.sink_node("UltraResTestSink", received)}
    executor, server = comfy_harness.execute_prompt(prompt, {**pack_nodes, **nodes})
    assert executor.success, server.messages[-1]
    texts = [text for node, text in server.texts if node == "3"]
    header = ("training GSPN weights for this SD15 model, 4 steps (shown.safetensors in " f"{gspn_folder})\n"
              "saved every 2 steps, at the end and if you cancel · loss: 1 = no better than nothing, lower is better")
    assert texts[0] == header and all(text.startswith(header + "\n") for text in texts[1:])
    steps = [text.split("\n")[-1] for text in texts[1:-1]]
    assert steps and all(re.fullmatch(r"step [1-4]/4 · loss [\d.e-]+( \(mean of the last \d: [\d.e-]+\))?"
                                      r"( · saved at step 2)?( · about .+ left)?", line) for line in steps)
    assert re.fullmatch(rf"finished in \d+ s: loss [\d.e-]+ \(mean of the last 4: [\d.e-]+\) · saved in "
                        rf"{re.escape(str(gspn_folder / 'shown.safetensors'))}", texts[-1].split("\n")[-1])
    curve = received["value"]
    assert curve.shape == (1, 360 + 2 * 16, 640, 3)
    assert (curve[0, 360:].numpy() < 0.5).any(), "the steps, losses and file are written under the curve"


def test_prediction_matching_trains_through_a_unet_loaded_in_inference_mode(pack_nodes, gspn_folder):
    with torch.inference_mode():  # ComfyUI loads checkpoints and runs nodes like this
        model = comfy_harness.tiny_sd15_patcher(seed=3)
        _, plot = _distill(pack_nodes, model, "with_prediction", steps=2, prediction_weight=0.5, cfg=2.0,
                           negative=comfy_harness.sd15_conditioning(seed=9)).result
    from ultrares.models.gspn import load_gspn_weights

    _, record = load_gspn_weights(gspn_folder / "with_prediction.safetensors", "SD15")
    assert len(record.prediction_losses) == 2 and record.settings["prediction_weight"] == 0.5
    assert plot.shape[0] == 1
    weights = list(model.get_model_object("diffusion_model").parameters())
    assert all(w.is_inference() for w in weights), "the caller's model must be left as it was"


def test_prediction_matching_sends_gradients_through_the_unet_to_every_gspn_layer(pack_nodes):
    from ultrares.models.gspn import GSPNConfig, GSPNLayers
    from ultrares.nodes.gspn.patch import unet_layers
    from ultrares.nodes.gspn.distillation import TrajectorySettings, with_host, with_weight_copies

    with torch.inference_mode():  # as ComfyUI loads checkpoints
        model = comfy_harness.tiny_sd15_patcher(seed=3)
    trajectory = TrajectorySettings(width=64, height=48, sampling_steps=2, cfg=2.0)
    with torch.inference_mode(False), torch.enable_grad():
        gspn = GSPNLayers(unet_layers(model), GSPNConfig(chunk=4, proxy_ratio=4))

        def run(host):
            prediction = host.student(host.start(0), host.sigmas()[0], 0, gspn)
            prediction.square().mean().backward()

        with_host(with_weight_copies(model), _prompts(), None, trajectory, 0, run)
    for spec, module in gspn.items():
        for name, parameter in module.named_parameters():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"{spec.name}.{name}"


@pytest.mark.parametrize("host", ["Dynamic VRAM", "no CoreModelPatcher"])
def test_the_gspn_modules_get_the_patcher_class_comfyui_builds_its_models_with(pack_nodes, gspn_folder, monkeypatch,
                                                                               host):
    # One plain ModelPatcher among the models of a load sends newer ComfyUI's whole load down
    # its non-dynamic path; 0.3.64 has no CoreModelPatcher at all.
    import comfy.model_patcher
    from ultrares.models.gspn import GSPNConfig, GSPNLayers, TrainingRecord, save_gspn_weights
    from ultrares.nodes.gspn.patch import ADDITIONAL_MODELS_KEY, unet_layers

    if host == "Dynamic VRAM":
        expected = comfy_harness.dynamic_patcher_standin()
        monkeypatch.setattr(comfy.model_patcher, "CoreModelPatcher", expected, raising=False)
    else:
        expected = comfy.model_patcher.ModelPatcher
        monkeypatch.delattr(comfy.model_patcher, "CoreModelPatcher", raising=False)
    model = comfy_harness.tiny_sd15_patcher(seed=1)
    torch.manual_seed(0)
    save_gspn_weights(gspn_folder / "random.safetensors", GSPNLayers(unet_layers(model), GSPNConfig()), "SD15",
                      TrainingRecord())
    (patched,) = pack_nodes["UltraResGSPNPatch"].execute(model, "random.safetensors", 0, "", 0).result
    (gspn_patcher,) = patched.get_additional_models_with_key(ADDITIONAL_MODELS_KEY)
    assert type(gspn_patcher) is expected
    cond = comfy_harness.sd15_conditioning()
    out = comfy_harness.sample(patched, cond, cond, torch.zeros(1, 4, 6, 8), seed=3)
    assert torch.isfinite(out).all()


class SharedCastBuffer:
    """Stand-in for the cast buffers of newer ComfyUI's ops (comfy/ops.py, Comfy-Org/ComfyUI
    0271a469: ``cast_modules_with_vbar`` casts a layer's weights into a per-stream buffer that the
    next layer's cast reuses, as raw memory autograd knows nothing of; low-VRAM offloading's
    ``get_cast_buffer`` in comfy/model_management.py 02b2b388 is alike). Every weight matrix
    ComfyUI's ops cast lands in one buffer, through a tensor of its own over that memory (so no
    version counter notices the overwrite, as with aimdo's raw pointers)."""

    def __init__(self, model, monkeypatch):
        import comfy.model_management

        self.original = comfy.model_management.cast_to
        largest = max(p.numel() for p in model.get_model_object("diffusion_model").parameters())
        self.buffer = torch.empty(largest, dtype=torch.float32)
        self.casts = 0
        monkeypatch.setattr(comfy.model_management, "cast_to", self.cast_to)

    def cast_to(self, weight, dtype=None, device=None, non_blocking=False, copy=False, stream=None, **kwargs):
        if not isinstance(weight, torch.nn.Parameter) or weight.ndim < 2 or (dtype or weight.dtype) != torch.float32:
            return self.original(weight, dtype, device, non_blocking, copy, stream, **kwargs)
        self.casts += 1
        view = torch.empty(0, dtype=torch.float32).set_(self.buffer.untyped_storage(), 0, weight.shape)
        return view.copy_(weight.detach())


def _prediction_matching_gradients(model) -> dict[str, torch.Tensor]:
    from ultrares.models.gspn import GSPNConfig, GSPNLayers
    from ultrares.nodes.gspn.patch import unet_layers
    from ultrares.nodes.gspn.distillation import TrajectorySettings, with_host, with_weight_copies

    trajectory = TrajectorySettings(width=64, height=48, sampling_steps=2, cfg=2.0)
    with torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(0)
        gspn = GSPNLayers(unet_layers(model), GSPNConfig(chunk=4, proxy_ratio=4))

        def run(host):
            host.student(host.start(0), host.sigmas()[0], 0, gspn).square().mean().backward()

        with_host(with_weight_copies(model), _prompts(), None, trajectory, 0, run)
    return {f"{spec.name}.{name}": p.grad for spec, module in gspn.items() for name, p in module.named_parameters()}


def test_prediction_matching_gradients_survive_cast_buffers_that_the_next_layer_overwrites(pack_nodes, monkeypatch):
    with torch.inference_mode():
        model = comfy_harness.tiny_sd15_patcher(seed=3)
    expected = _prediction_matching_gradients(model)
    shared = SharedCastBuffer(model, monkeypatch)
    got = _prediction_matching_gradients(model)
    assert shared.casts > 0, "the UNet's weights did not go through ComfyUI's cast"
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, msg=name)
