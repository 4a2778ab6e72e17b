"""CLEAR Distill on ComfyUI's real Flux classes (tiny random FLUX, CPU): the file it writes has
the released layout and loads in the CLEAR patch node, which then samples closer to the dense
teacher than the window alone does; the backward recomputed block by block equals the whole
graph's; resumed equals unbroken; a cancelled run leaves a usable file; a file for another
window is refused by the patch node."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import comfy_harness

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

DEPTH, DEPTH_SINGLE = 2, 3   # single block 2 is the reference's distilled attention ((2 + 2) % 4 == 0)
STD = 0.15                   # weights spread enough that the window changes the output clearly
RADIUS = 3
LATENT = (1, 16, 16, 16)     # 128 px: an 8 x 8 token grid, larger than the window


def tiny_flux():
    return comfy_harness.tiny_flux_patcher(seed=1, std=STD, depth_single_blocks=DEPTH_SINGLE)


def prompts():
    """Two prompts joined as two entries of one CONDITIONING (Conditioning (Combine))."""
    return comfy_harness.flux_conditioning(seed=1) + comfy_harness.flux_conditioning(seed=2)


@pytest.fixture
def clear_folder(only_model_folder):
    """models/clear is an empty folder of this test only."""
    return only_model_folder("clear")


def distill_node(pack_nodes, model, name, steps, **overrides):
    # A random teacher's samples are not of its own flow, so flow matching would pull the student
    # away from it: the tests train the two distillation terms (the node's default adds it, weight 1).
    args = dict(model=model, positive=prompts(), output_name=name, window_radius=RADIUS, down_factor=1, steps=steps,
                learning_rate=3e-4, resolution=128, batch_size=1, teacher_samples=4, sampling_steps=3, cfg=1.0,
                flow_matching_weight=0.0, prediction_weight=0.5, attention_weight=0.5, seed=0, resume=False,
                save_every=0, optimizer_on_cpu=False)
    args.update(overrides)
    return pack_nodes["UltraResClearDistill"].execute(**args).result


def patch_node(pack_nodes, model, weights, radius=0, down=0):
    (patched,) = pack_nodes["UltraResClearPatch"].execute(model, weights, radius, down, 1.0, False, 0, "auto").result
    return patched


def sample(model, seed):
    cond = comfy_harness.flux_conditioning(seed=7)
    return comfy_harness.sample(model, cond, cond, torch.zeros(LATENT), steps=4, seed=seed)


def distance(a, b) -> float:
    return (a - b).pow(2).mean().item()


def test_the_distilled_file_has_the_released_layout_and_brings_the_patched_model_closer_to_the_teacher(
        pack_nodes, clear_folder):
    from ultrares.models.clear.distill import ATTENTION, PREDICTION
    from ultrares.models.clear.weights import released_keys

    model = tiny_flux()
    patched, plot = distill_node(pack_nodes, model, "clear_local_3_tiny", steps=60)
    path = clear_folder / "clear_local_3_tiny.safetensors"
    with safe_open(str(path), framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert keys == set(released_keys(DEPTH, DEPTH_SINGLE, False))
    assert (metadata["window_size"], metadata["down_factor"], metadata["base_model"]) == ("3", "1", "Flux")
    assert plot.shape == (1, 360 + 2 * 16, 640, 3) and 0 <= plot.min() and plot.max() <= 1

    import json
    losses = json.loads(metadata["training"])["losses"]
    # A short run lowers both losses (measured, mean of the first / last 6 steps: prediction 0.24 / 0.045,
    # attention 0.52 / 0.074; noisy per step, a random noise level each).
    for name in (PREDICTION, ATTENTION):
        assert sum(losses[name][-6:]) < 0.5 * sum(losses[name][:6]), (name, losses[name])

    loaded = patch_node(pack_nodes, model, "clear_local_3_tiny.safetensors")
    window_only = patch_node(pack_nodes, model, "none", radius=RADIUS)
    for seed in (11, 12):  # held-out noise and prompt
        teacher = sample(model, seed)
        distilled = sample(loaded, seed)
        torch.testing.assert_close(sample(patched, seed), distilled, rtol=0, atol=0)
        # Measured: window alone 2.56 / 2.44, distilled 0.49 / 0.44 (mean squared latent distance).
        assert distance(distilled, teacher) < 0.4 * distance(sample(window_only, seed), teacher)


def test_a_file_for_another_window_is_refused_by_the_patch_node(pack_nodes, clear_folder):
    model = tiny_flux()
    distill_node(pack_nodes, model, "made_for_3", steps=1, down_factor=2)
    assert patch_node(pack_nodes, model, "made_for_3.safetensors", radius=3, down=2) is not None
    with pytest.raises(ValueError, match="made_for_3.safetensors holds CLEAR weights made for window_radius 3 \\(its "
                                         "metadata says so\\), but window_radius is set to 5"):
        patch_node(pack_nodes, model, "made_for_3.safetensors", radius=5)
    with pytest.raises(ValueError, match="made for down_factor 2 \\(its metadata says so\\), but down_factor is set "
                                         "to 4"):
        patch_node(pack_nodes, model, "made_for_3.safetensors", down=4)


def _gradients(model, student, pattern, recompute: bool) -> dict[str, torch.Tensor]:
    from ultrares.models.clear.distill import attention_loss, mse
    from ultrares.nodes.clear.distillation import ComfyClearHost, training_patcher
    from ultrares.nodes.training import TrajectorySettings, inside_sampling

    training, mode = training_patcher(model, student)
    blocks = [("single", 2)]

    def run(context):
        host = ComfyClearHost(context, mode, DEPTH, DEPTH_SINGLE, recompute=recompute)
        x, sigma = host.start(3), host.sigmas()[1]
        with torch.no_grad():
            teacher = host.teacher(x, sigma, 1, blocks)
        out = host.student(x, sigma, 1, blocks, student)
        student.zero_grad(set_to_none=True)
        (mse(out.velocity, teacher.velocity) + attention_loss(out.attention, teacher.attention)).backward()
        return {key: p.grad.clone() for key, p in student.by_key().items()}

    with torch.inference_mode(False):
        return inside_sampling(training, prompts(), None, TrajectorySettings(128, 128, 1, 3, 1.0, "simple"), 0, run)


@pytest.mark.parametrize("down", [1, 2])
def test_the_backward_recomputed_block_by_block_equals_the_whole_graphs(pack_nodes, down):
    from ultrares.models.clear.pattern import ClearPattern
    from ultrares.models.clear.student import ClearStudent
    from ultrares.models.clear.weights import released_keys

    model = tiny_flux()
    g = torch.Generator().manual_seed(4)
    tensors = {key: torch.randn((64, 64) if key.endswith("weight") else (64,), generator=g) * STD
               for key in released_keys(DEPTH, DEPTH_SINGLE, False)}
    student = ClearStudent(tensors, ClearPattern(RADIUS, down), DEPTH, DEPTH_SINGLE).requires_grad_(True)
    if down > 1:
        with torch.no_grad():  # per-layer spatial weights away from the mean, so each block's own one counts
            for p in student.spatial_weights().values():
                p.add_(torch.rand(p.shape, generator=g) * 0.2)
    whole = _gradients(model, student, student.pattern, recompute=False)
    recomputed = _gradients(model, student, student.pattern, recompute=True)
    assert all(grad.abs().max() > 0 for grad in whole.values())
    for key, grad in whole.items():
        torch.testing.assert_close(recomputed[key], grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{key}: {m}")


def _run(model, path, steps, resume, **settings):
    from ultrares.models.clear.distill import ClearDistillSettings
    from ultrares.models.clear.pattern import ClearPattern
    from ultrares.nodes.clear.distillation import run_clear_distillation
    from ultrares.nodes.training import TrajectorySettings

    values = dict(steps=steps, learning_rate=3e-4, samples=3, batch_size=2, flow_matching_weight=1.0, save_every=0)
    values.update(settings)
    return run_clear_distillation(model, prompts(), None, path, ClearPattern(RADIUS, 2), ClearDistillSettings(**values),
                                  TrajectorySettings(128, 128, 1, 3, 1.0, "simple"), resume)


def test_a_resumed_run_equals_an_unbroken_one_and_reuses_the_teachers_samples(pack_nodes, tmp_path):
    model = tiny_flux()
    unbroken, _ = _run(model, tmp_path / "unbroken.safetensors", steps=4, resume=False)
    path = tmp_path / "resumed.safetensors"
    _run(model, path, steps=2, resume=False, optimizer_on_cpu=True)  # the optimizer in RAM: the same numbers
    samples = sorted(p.name for p in (tmp_path / "resumed.safetensors.samples").glob("*.latent"))
    assert samples == ["000000.latent", "000001.latent", "000002.latent"]
    with pytest.raises(FileExistsError, match="turn on resume"):
        _run(model, path, steps=2, resume=False)
    resumed, record = _run(model, path, steps=2, resume=True)
    assert record.steps == 4 and record.finished and len(record.losses["total"]) == 4
    for key, value in unbroken.by_key().items():
        torch.testing.assert_close(resumed.by_key()[key], value, rtol=1e-6, atol=1e-7, msg=lambda m: f"{key}: {m}")
    assert any(not torch.equal(value, resumed.by_key()[key]) for key, value in _run(
        model, tmp_path / "other.safetensors", steps=2, resume=False)[0].by_key().items())


def test_samples_of_another_model_of_the_same_family_are_made_again(pack_nodes, tmp_path, caplog):
    path = tmp_path / "run.safetensors"
    _run(tiny_flux(), path, steps=1, resume=False)
    folder = tmp_path / "run.safetensors.samples"
    made = {p.name: p.read_bytes() for p in folder.glob("*.latent")}
    path.unlink()  # the same run again, from the start, for another fine-tune of the family
    other = comfy_harness.tiny_flux_patcher(seed=2, std=STD, depth_single_blocks=DEPTH_SINGLE)
    with caplog.at_level("INFO"):
        _run(other, path, steps=1, resume=False)
    assert "were made with another teacher" in caplog.text
    remade = {p.name: p.read_bytes() for p in folder.glob("*.latent")}
    assert set(remade) == set(made) and all(remade[name] != made[name] for name in made)


def test_a_cancelled_run_saves_a_file_the_patch_node_loads_and_resume_continues(pack_nodes, clear_folder):
    import comfy.model_management

    from ultrares.models.clear.distilled import read_distilled

    model = tiny_flux()
    steps_done = []

    def check_interrupt():  # the cancel button, pressed during the third step
        if len(steps_done) >= 2:
            raise comfy.model_management.InterruptProcessingException()

    from ultrares.models.clear.distill import ClearDistillSettings
    from ultrares.models.clear.pattern import ClearPattern
    from ultrares.nodes.clear.distillation import run_clear_distillation
    from ultrares.nodes.training import TrajectorySettings

    path = clear_folder / "cancelled.safetensors"
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run_clear_distillation(model, prompts(), None, path, ClearPattern(RADIUS, 2),
                               ClearDistillSettings(steps=10, samples=3, save_every=0),
                               TrajectorySettings(128, 128, 1, 3, 1.0, "simple"), False,
                               on_progress=lambda done, total: steps_done.append(done),
                               check_interrupt=check_interrupt)
    _, pattern, base, record = read_distilled(path)
    assert record.steps == 2 and not record.finished and base == "Flux" and pattern == ClearPattern(RADIUS, 2)
    assert patch_node(pack_nodes, model, "cancelled.safetensors") is not None
    patched, _ = distill_node(pack_nodes, model, "cancelled", steps=1, down_factor=2, teacher_samples=3,
                              flow_matching_weight=1.0, resume=True)
    assert read_distilled(path)[3].steps == 3


def test_the_distill_node_logs_its_losses_every_save_and_how_a_cancel_left_the_file(pack_nodes, clear_folder,
                                                                                     monkeypatch, caplog):
    import re

    import comfy.model_management

    import ultrares.nodes.clear.nodes as clear_nodes

    steps_done = []

    class Counting(clear_nodes.NodeFeedback):
        def progress(self, done, total, preview=None):
            steps_done.append(done)
            super().progress(done, total, preview)

    def cancel_during_the_fourth_step():  # the cancel button (also checked while the teacher draws)
        if len(steps_done) >= 3:
            raise comfy.model_management.InterruptProcessingException()

    path = clear_folder / "told.safetensors"
    monkeypatch.setattr(clear_nodes, "NodeFeedback", Counting)
    monkeypatch.setattr(clear_nodes, "check_interrupt", cancel_during_the_fourth_step)
    with caplog.at_level("INFO"), pytest.raises(comfy.model_management.InterruptProcessingException):
        distill_node(pack_nodes, tiny_flux(), "told", steps=10, save_every=2)
    assert f"CLEAR Distill: saved step 2 to {path}" in caplog.text
    assert re.search(r"CLEAR Distill: step 2/10 \(step 2 of the file\): loss [\d.e-]+ \(mean of the last 2: "
                     r"[\d.e-]+\) · flow matching [\d.e-]+, prediction [\d.e-]+, attention [\d.e-]+", caplog.text), caplog.text
    assert (f"CLEAR Distill: cancelled after 3 of 10 steps: the weights so far (step 3) are saved in {path}; turn on "
            "resume to continue training them") in caplog.text

    monkeypatch.setattr(clear_nodes, "check_interrupt", lambda: None)
    with caplog.at_level("INFO"):
        _, curve = distill_node(pack_nodes, tiny_flux(), "told", steps=1, resume=True)
    assert re.search(rf"CLEAR Distill: finished 1 steps \(4 in the file\): loss [\d.e-]+ \(mean of the last 4: "
                     rf"[\d.e-]+\).*; the weights are in {re.escape(str(path))}", caplog.text), caplog.text
    assert curve.shape == (1, 360 + 2 * 16, 640, 3)
    assert (curve[0, 360:].numpy() < 0.5).any(), "the steps, losses and file are written under the curves"
