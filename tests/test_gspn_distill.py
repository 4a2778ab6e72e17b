"""Distillation on the tiny stand-in UNet: it learns, it saves usable checkpoints when stopped,
it resumes, and it draws its loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gspn_standin import StandInHost, TinyUNet, held_out_loss
from ultrares.models.gspn import GSPNConfig, GSPNLayers, find_attn1_layers, load_gspn_weights, save_gspn_weights
from ultrares.models.gspn.distill import (DistillSettings, distill, layer_matching_backward,
                                         layer_matching_loss, trajectory_points)
from ultrares.models.gspn.optimizer_state import (load_optimizer_state, make_optimizer, optimizer_path,
                                                  save_optimizer_state)
from ultrares.models.training import draw_loss_plot

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

FAMILY = "TinyStandIn"
HELD_OUT_SEED = 10_000


@pytest.fixture(scope="module")
def host():
    return StandInHost(TinyUNet(seed=0))


def _student(host, seed=0):
    torch.manual_seed(seed)
    return GSPNLayers(find_attn1_layers(host.model), GSPNConfig(chunk=4, proxy_ratio=4))


def _saver(path, student):
    saves = []

    def save(record):
        saves.append(record.steps)
        save_gspn_weights(path, student, FAMILY, record)

    return save, saves


class Stop(Exception):
    pass


def test_distillation_brings_attn1_matching_loss_well_below_random_gspn_weights(host, tmp_path):
    student = _student(host)
    random_loss = held_out_loss(student, host, points=6, seed=HELD_OUT_SEED)
    save, saves = _saver(tmp_path / "gspn.safetensors", student)
    record = distill(host, student, DistillSettings(steps=50, learning_rate=1e-2, save_every=20), save=save)
    trained_loss = held_out_loss(student, host, points=6, seed=HELD_OUT_SEED)
    assert trained_loss < 0.5 * random_loss, (random_loss, trained_loss)
    assert record.steps == 50 and record.finished and len(record.layer_losses) == 50
    assert saves == [20, 40, 50]
    loaded, saved_record = load_gspn_weights(tmp_path / "gspn.safetensors", FAMILY, student.specs)
    assert saved_record.finished and saved_record.steps == 50
    assert held_out_loss(loaded, host, points=6, seed=HELD_OUT_SEED) == pytest.approx(trained_loss, rel=1e-5)


def test_layer_by_layer_backward_gives_the_gradients_of_the_whole_layer_loss(host):
    captures = next(trajectory_points(host, seed=5)).captures
    student = _student(host).requires_grad_(True)
    whole = layer_matching_loss(student, captures)
    whole.backward()
    expected = {name: p.grad.clone() for name, p in student.named_parameters()}
    student.zero_grad(set_to_none=True)
    torch.testing.assert_close(layer_matching_backward(student, captures), whole.detach())
    for name, p in student.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], msg=lambda m: f"{name}: {m}")


def test_trajectories_follow_the_teacher_and_cycle_through_the_prompts(host):
    points = trajectory_points(host, seed=3)
    first = [next(points) for _ in range(host.sampling_steps * 2)]
    assert [p.prompt for p in first] == [0] * host.sampling_steps + [1] * host.sampling_steps
    sigmas = host.sigmas()
    a, b = first[0], first[1]
    expected = a.x + (a.x - a.denoised) / sigmas[0] * (sigmas[1] - sigmas[0])
    torch.testing.assert_close(b.x, expected)
    assert set(a.captures) == {s.name for s in find_attn1_layers(host.model)}
    capture = a.captures["middle_block.1.transformer_blocks.0.attn1"]
    assert (capture.height, capture.width) == (4, 6) and capture.q.shape == (1, 24, 32)


def test_interruption_still_saves_a_checkpoint_of_the_steps_done(host, tmp_path):
    # Resuming such a checkpoint through the node (cancel after 3, resume to 5) is tested in
    # integration/test_gspn_nodes.py; resuming the loop itself, exactly, in the test below.
    path = tmp_path / "gspn.safetensors"
    student = _student(host)
    save, saves = _saver(path, student)
    calls, progress = [], []

    def check_interrupt():
        calls.append(1)
        if len(calls) > 3:
            raise Stop("cancelled")

    with pytest.raises(Stop):
        distill(host, student, DistillSettings(steps=10, learning_rate=1e-2, save_every=0), save=save,
                on_progress=lambda done, total: progress.append((done, total)), check_interrupt=check_interrupt)
    assert saves == [3] and progress == [(1, 10), (2, 10), (3, 10)]
    resumed, record = load_gspn_weights(path, FAMILY, student.specs)
    assert record.steps == 3 and not record.finished and len(record.layer_losses) == 3
    for key, value in student.named_state().items():
        torch.testing.assert_close(resumed.named_state()[key], value, rtol=0, atol=0)


def test_a_run_resumed_with_its_saved_optimizer_state_continues_exactly_like_an_unbroken_run(host, tmp_path):
    settings = DistillSettings(steps=3, learning_rate=1e-2, save_every=0)
    unbroken = _student(host)
    optimizer = make_optimizer(unbroken, settings.learning_rate)
    record = distill(host, unbroken, settings, optimizer=optimizer)
    distill(host, unbroken, settings, record=record, optimizer=optimizer)

    path = tmp_path / "gspn.safetensors"
    first = _student(host)
    optimizer = make_optimizer(first, settings.learning_rate)

    def save(r):
        save_gspn_weights(path, first, FAMILY, r)
        save_optimizer_state(optimizer_path(path), first, optimizer, r.steps)

    distill(host, first, settings, save=save, optimizer=optimizer)

    def resume(restore: bool):
        student, record = load_gspn_weights(path, FAMILY, first.specs)
        optimizer = make_optimizer(student, settings.learning_rate)
        assert load_optimizer_state(optimizer_path(path), student, optimizer, record.steps) is True
        if not restore:
            optimizer.state.clear()
        distill(host, student, settings, record=record, optimizer=optimizer)
        return student.named_state()

    resumed, restarted = resume(restore=True), resume(restore=False)
    for key, value in unbroken.named_state().items():
        torch.testing.assert_close(resumed[key], value, msg=lambda m: f"{key}: {m}")
    assert any(not torch.allclose(restarted[k], v, rtol=1e-4, atol=1e-6) for k, v in unbroken.named_state().items()), \
        "restarting the optimiser must make a difference, or this test shows nothing"


def test_optimizer_state_is_only_restored_onto_the_weights_it_was_saved_with(host, tmp_path):
    student = _student(host)
    optimizer = make_optimizer(student, 1e-2)
    distill(host, student, DistillSettings(steps=1, learning_rate=1e-2), optimizer=optimizer)
    path = tmp_path / "gspn.safetensors.optimizer"
    save_optimizer_state(path, student, optimizer, steps=1)
    fresh = make_optimizer(student, 1e-2)
    assert not load_optimizer_state(tmp_path / "missing.optimizer", student, fresh, 1)
    assert not load_optimizer_state(path, student, fresh, steps=2), "weights saved at another step"
    other = GSPNLayers(student.specs, GSPNConfig(chunk=4, proxy_ratio=2))
    assert not load_optimizer_state(path, other, make_optimizer(other, 1e-2), 1), "another proxy width"
    assert len(fresh.state) == 0
    assert load_optimizer_state(path, student, fresh, 1)
    for p in student.parameters():
        torch.testing.assert_close(fresh.state[p]["exp_avg_sq"], optimizer.state[p]["exp_avg_sq"], rtol=0, atol=0)


def test_an_interruption_before_the_first_step_writes_nothing(host, tmp_path):
    student = _student(host)
    save, saves = _saver(tmp_path / "gspn.safetensors", student)

    def stop():
        raise Stop("cancelled")

    with pytest.raises(Stop):
        distill(host, student, DistillSettings(steps=3), save=save, check_interrupt=stop)
    assert saves == [] and not (tmp_path / "gspn.safetensors").exists()


def test_final_prediction_matching_is_added_when_weighted(host):
    student = _student(host)
    record = distill(host, student, DistillSettings(steps=2, learning_rate=1e-3, prediction_weight=0.5))
    assert len(record.prediction_losses) == 2 and all(v > 0 for v in record.prediction_losses)
    assert record.settings["prediction_weight"] == 0.5


def test_loss_plot_is_an_rgb_image_with_one_colour_per_series():
    image = draw_loss_plot({"attn1": [1.0 / (i + 1) for i in range(40)], "prediction": [0.5] * 40},
                           width=320, height=200)
    assert image.shape == (200, 320, 3) and image.dtype == np.uint8
    colours = {tuple(c) for c in image.reshape(-1, 3)}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours
    assert draw_loss_plot({"attn1": []}).shape == (360, 640, 3)
    noted = draw_loss_plot({"attn1": [0.5, 0.25]}, notes=["saved to models/gspn/x.safetensors", "2 steps"])
    assert noted.shape == (360 + 2 * 16, 640, 3) and (noted[360:] < 128).any(), "the notes are written under it"
