"""CLEAR distillation on the tiny stand-in Flux (no ComfyUI): the reference's data, losses and
trained tensors; it learns; stopped runs leave usable files; a resumed run equals an unbroken one."""

from __future__ import annotations

import pytest
import torch

from clear_standin import StandInFlux, StandInHost
from ultrares.models.clear.distill import (ATTENTION, FLOW_MATCHING, PREDICTION, ClearDistillSettings,
                                           attention_loss_blocks, distill, make_optimizer, pool_index, teacher_sample,
                                           training_point)
from ultrares.models.clear.distilled import (CLEAR_OPTIMIZER_STATE, OPTIMIZER_FORMAT, file_dtype, read_distilled,
                                             save_distilled)
from ultrares.models.clear.pattern import ClearPattern
from ultrares.models.clear.samples import FolderSamples, MemorySamples
from ultrares.models.clear.student import ClearStudent, assemble
from ultrares.models.clear.weights import ClearWeightsError, released_keys
from ultrares.models.training import TOTAL, load_optimizer_state, optimizer_path, save_optimizer_state

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

PATTERN = ClearPattern(radius=2, down_factor=2)
HELD_OUT_SEED = 777


@pytest.fixture(scope="module")
def model():
    return StandInFlux(seed=0)


def _host(model, pattern=PATTERN):
    return StandInHost(model, pattern)


def _student(model, pattern=PATTERN):
    return ClearStudent(model.released, pattern, model.depth, model.depth_single)


def _settings(**overrides):
    values = dict(steps=4, learning_rate=3e-3, batch_size=2, samples=3, seed=1, save_every=0)
    values.update(overrides)
    return ClearDistillSettings(**values)


class Stop(Exception):
    pass


def held_out(host, student, points=6):
    """Mean prediction and attention distances to the teacher on held-out draws of the teacher's samples."""
    blocks = attention_loss_blocks(student.depth, student.depth_single)
    prediction = attention = 0.0
    with torch.no_grad():
        for i in range(points):
            x0 = teacher_sample(host, i, HELD_OUT_SEED)
            x, sigma, _ = training_point(x0, HELD_OUT_SEED, i)
            teacher = host.teacher(x, sigma, i % host.prompt_count, blocks)
            out = host.student(x, sigma, i % host.prompt_count, blocks, student)
            prediction += (out.velocity - teacher.velocity).pow(2).mean().item() / points
            attention += sum((out.attention[b] - teacher.attention[b]).pow(2).mean().item() for b in blocks) / len(blocks) / points
    return prediction, attention


def test_the_attention_term_uses_the_reference_layers_single_blocks_1_5_to_37_of_flux1():
    assert attention_loss_blocks(19, 38) == [("single", j) for j in (1, 5, 9, 13, 17, 21, 25, 29, 33, 37)]
    assert attention_loss_blocks(1, 4) == [("single", 3)]
    assert attention_loss_blocks(2, 2) == []


def test_training_points_follow_flow_matching_with_a_uniform_noise_level_on_the_1000_step_grid():
    x0 = torch.randn(1, 4, 3, 3)
    sigmas = []
    for position in range(300):
        x, sigma, noise = training_point(x0, seed=5, position=position)
        torch.testing.assert_close(x, (1 - sigma) * x0 + sigma * noise)
        sigmas.append(float(sigma))
    assert all(0 < s <= 1 and abs(s * 1000 - round(s * 1000)) < 1e-4 for s in sigmas)
    assert 0.4 < sum(sigmas) / len(sigmas) < 0.6 and min(sigmas) < 0.05 and max(sigmas) > 0.95, "uniform, no shift"
    again = training_point(x0, seed=5, position=7)
    torch.testing.assert_close(again[2], training_point(x0, seed=5, position=7)[2], rtol=0, atol=0)
    assert not torch.equal(again[2], training_point(x0, seed=6, position=7)[2])


def test_every_sample_is_drawn_once_per_epoch_in_a_shuffled_order():
    first, second = ([pool_index(p, 5, seed=3) for p in range(start, start + 5)] for start in (0, 5))
    assert sorted(first) == sorted(second) == list(range(5))
    assert first != second or first != list(range(5))


def test_the_student_holds_exactly_the_released_tensors_and_saves_them_in_the_released_layout(model, tmp_path):
    student = _student(model)
    assert list(student.by_key()) == released_keys(model.depth, model.depth_single, True)
    spatial = student.file_tensors(torch.bfloat16)["single_transformer_blocks.2.attn.processor.spatial_weight"]
    assert spatial.shape == (1, 1, 1, 2, 1, 2, 1) and spatial.dtype == torch.bfloat16
    torch.testing.assert_close(spatial.float(), torch.full_like(spatial, 0.25).float())  # the reference's 1/d^2
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert file_dtype(torch.float8_e4m3fn) == torch.bfloat16 and file_dtype(torch.float16) == torch.float16


def test_fused_weights_are_assembled_from_the_trained_slices_and_the_teachers_rest():
    weight = torch.arange(20.0).reshape(10, 2)
    q, v = torch.zeros(2, 2, requires_grad=True), torch.ones(3, 2, requires_grad=True)
    fused = assemble(weight, [((0, 5, 3), v), ((0, 0, 2), q)])
    torch.testing.assert_close(fused, torch.cat([q, weight[2:5], v, weight[8:]]).detach())
    fused.sum().backward()
    assert q.grad.eq(1).all() and v.grad.eq(1).all()
    whole = torch.full((10, 2), 3.0, requires_grad=True)
    assert assemble(weight.half(), [(None, whole)]).dtype == torch.float16


def test_distillation_lowers_the_prediction_and_attention_distances_to_the_teacher(model):
    # A random teacher's samples are not of its own flow (flow matching would pull the student
    # away from it): here only the two distillation terms train.
    host = _host(model)
    student = _student(model)
    before = held_out(host, student)
    record = distill(host, student, _settings(steps=40, learning_rate=3e-3, samples=4, batch_size=1,
                                              flow_matching_weight=0.0), MemorySamples())
    after = held_out(host, student)
    # Measured: prediction 0.69 -> 0.48, attention 0.31 -> 0.23 on held-out samples.
    assert after[0] < 0.85 * before[0] and after[1] < 0.85 * before[1], (before, after)
    assert record.steps == 40 and record.finished
    assert set(record.losses) == {FLOW_MATCHING, PREDICTION, ATTENTION, TOTAL}
    for name in (PREDICTION, ATTENTION):  # the training curves fall too (noisy: a random sigma per step)
        curve = record.losses[name]
        assert len(curve) == 40 and sum(curve[-10:]) < 0.9 * sum(curve[:10]), (name, curve)


def test_the_total_is_the_reference_weighting_of_its_terms(model):
    record = distill(_host(model), _student(model), _settings(steps=2), MemorySamples())
    for i in range(2):
        terms = {name: values[i] for name, values in record.losses.items()}
        assert terms[TOTAL] == pytest.approx(terms[FLOW_MATCHING] + 0.5 * terms[PREDICTION] + 0.5 * terms[ATTENTION])
    assert record.settings["prediction_weight"] == 0.5 and record.settings["attention_weight"] == 0.5


def test_teacher_samples_are_made_once_and_kept(model):
    host, samples = _host(model), MemorySamples()
    distill(host, _student(model), _settings(steps=3, batch_size=2, samples=3), samples)
    assert sorted(samples.samples) == [0, 1, 2]
    assert host.calls["guided"] == 3 * len(host.sigmas()[1:]), "each sample's trajectory ran once"
    assert host.calls["student"] == host.calls["teacher"] == 6
    torch.testing.assert_close(samples.samples[1], teacher_sample(host, 1, seed=1), rtol=0, atol=0)


def _save(path, student, optimizer):
    def save(record):
        save_distilled(path, student, "StandIn", record, torch.bfloat16)
        save_optimizer_state(optimizer_path(path), student.by_key(), optimizer, record.steps, OPTIMIZER_FORMAT,
                             masters=True)
    return save


def test_a_resumed_run_continues_exactly_like_an_unbroken_one(model, tmp_path):
    settings = _settings(steps=3)
    host = _host(model)
    unbroken = _student(model)
    optimizer = make_optimizer(unbroken, settings)
    record = distill(host, unbroken, settings, MemorySamples(), optimizer=optimizer)
    distill(host, unbroken, settings, MemorySamples(), record=record, optimizer=optimizer)

    path = tmp_path / "clear_local_2_down_2.safetensors"
    first = _student(model)
    optimizer = make_optimizer(first, settings)
    distill(host, first, settings, MemorySamples(), save=_save(path, first, optimizer), optimizer=optimizer)

    def resume(restore: bool):
        tensors, pattern, base, record = read_distilled(path, PATTERN)
        assert base == "StandIn" and record.steps == 3 and tensors["transformer_blocks.0.attn.to_q.weight"].dtype == torch.bfloat16
        student = ClearStudent(tensors, pattern, model.depth, model.depth_single)
        optimizer = make_optimizer(student, settings)
        assert load_optimizer_state(optimizer_path(path), student.by_key(), optimizer, record.steps,
                                    CLEAR_OPTIMIZER_STATE)
        if not restore:
            optimizer.state.clear()
        distill(host, student, settings, MemorySamples(), record=record, optimizer=optimizer)
        return student.by_key()

    resumed, restarted = resume(restore=True), resume(restore=False)
    for key, value in unbroken.by_key().items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=lambda m: f"{key}: {m}")
    assert any(not torch.allclose(restarted[k], v, rtol=1e-4, atol=1e-6) for k, v in unbroken.by_key().items()), \
        "restarting the optimiser must make a difference, or this test shows nothing"


def test_a_cancelled_run_saves_a_file_that_loads_and_resumes(model, tmp_path):
    path = tmp_path / "distilled.safetensors"
    host, student = _host(model), _student(model)
    optimizer = make_optimizer(student, _settings())
    cancelled = []

    def check_interrupt():  # the cancel button, pressed during the third step
        if cancelled:
            raise Stop("cancelled")

    with pytest.raises(Stop):
        distill(host, student, _settings(steps=10, batch_size=1), MemorySamples(), save=_save(path, student, optimizer),
                on_progress=lambda done, total: cancelled.append(done) if done == 2 else None,
                check_interrupt=check_interrupt, optimizer=optimizer)
    tensors, pattern, _, record = read_distilled(path)
    assert pattern == PATTERN and not record.finished and record.steps == 2
    assert len(record.losses[TOTAL]) == record.steps
    for key, value in student.file_tensors(torch.bfloat16).items():
        torch.testing.assert_close(tensors[key], value, rtol=0, atol=0)
    resumed = ClearStudent(tensors, pattern, model.depth, model.depth_single)
    record = distill(host, resumed, _settings(steps=1), MemorySamples(), record=record)
    assert record.finished and len(record.losses[TOTAL]) == record.steps


def test_an_interruption_before_the_first_step_writes_nothing(model, tmp_path):
    path = tmp_path / "none.safetensors"
    student = _student(model)

    def stop():
        raise Stop("cancelled")

    with pytest.raises(Stop):
        distill(_host(model), student, _settings(), MemorySamples(), save=_save(path, student, make_optimizer(student, _settings())),
                check_interrupt=stop)
    assert not path.exists()


def test_a_file_for_another_window_or_a_released_file_is_not_resumed(model, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "distilled.safetensors"
    student = _student(model)
    distill(_host(model), student, _settings(steps=1), MemorySamples(),
            save=lambda r: save_distilled(path, student, "StandIn", r))
    with pytest.raises(ClearWeightsError, match="radius 2 and down factor 2, not radius 3 and down factor 2"):
        read_distilled(path, ClearPattern(3, 2))
    released = tmp_path / "clear_local_8.safetensors"
    save_file(student.file_tensors(torch.bfloat16), str(released))
    with pytest.raises(ClearWeightsError, match="not written by CLEAR Distill"):
        read_distilled(released)


def test_no_distilled_layer_with_an_attention_weight_is_refused():
    flat = StandInFlux(seed=1, depth=2, depth_single=2)
    with pytest.raises(ValueError, match="set the attention weight to 0"):
        distill(_host(flat), _student(flat), _settings(), MemorySamples())
    record = distill(_host(flat), _student(flat), _settings(steps=1, attention_weight=0.0), MemorySamples())
    assert ATTENTION not in record.losses


def test_samples_on_disk_outlive_the_run_and_are_dropped_for_another_recipe(tmp_path):
    recipe = {"width": 64, "prompts": "abc", "steps": 4}
    store = FolderSamples(tmp_path / "samples", recipe)
    store.put(3, torch.ones(1, 4, 2, 2))
    torch.testing.assert_close(FolderSamples(tmp_path / "samples", dict(recipe)).get(3), torch.ones(1, 4, 2, 2))
    assert FolderSamples(tmp_path / "samples", recipe).get(2) is None
    (tmp_path / "samples" / "000004.latent").write_bytes(b"cut short")
    assert FolderSamples(tmp_path / "samples", recipe).get(4) is None
    assert FolderSamples(tmp_path / "samples", {**recipe, "steps": 8}).get(3) is None
    assert len(FolderSamples(tmp_path / "samples", recipe)) == 0


def test_the_cost_model_counts_flux1_and_the_released_files_tensors():
    from ultrares.models.clear.training_cost import FLUX1, training_memory

    assert 11.8e9 < FLUX1.parameters() < 12.0e9  # FLUX.1-dev: 11.9 B parameters
    h = FLUX1.hidden
    released = sum(h * h if key.endswith(".weight") else h for key in released_keys(FLUX1.depth, FLUX1.depth_single, False))
    assert FLUX1.trained_parameters() == released
    small, large = (training_memory(FLUX1, side, 2) for side in (1024, 2048))
    assert small.trainable_state == large.trainable_state == released * 16
    assert small.activations < large.activations < 4 * small.activations  # linear in the tokens, plus a constant


def test_the_readme_prints_the_cost_tables_of_the_stated_model():
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("clear_distill_cost", root / "scripts" / "clear_distill_cost.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    readme = (root / "README.md").read_text()
    printed = readme.split(script.BEGIN, 1)[1].split(script.END, 1)[0].strip()
    assert printed == script.readme_block(), "python scripts/clear_distill_cost.py --readme"
