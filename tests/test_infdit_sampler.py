"""EDM preconditioning, the Heun sampler, and whole samples under any block schedule."""

from __future__ import annotations

import math

import pytest
import torch

from ultrares.models.infdit._full_reference import reference_upscale_4x
from ultrares.models.infdit.budget import UpscaleOptions
from ultrares.models.infdit.evaluate import ImageContext, LRContext, evaluate
from ultrares.models.infdit.network import InfDiT
from ultrares.models.infdit.sampler import (NOISE_CHUNK, edm_precondition, edm_sigmas, evaluations, heun_sample,
                                            initial_state)
from ultrares.models.infdit.schedule import Placement, plan_batches, plan_schedule
from ultrares.models.infdit.tiny import TINY, tiny_weights
from ultrares.models.infdit.upscale import upscale

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

CPU = torch.device("cpu")


def test_the_schedule_has_the_released_sigmas():
    expected = [40.0, 30.09, 22.37, 16.41, 11.87, 8.446, 5.909, 4.055, 2.724, 1.787, 1.140, 0.7059,
                0.4218, 0.2419, 0.1322, 0.06828, 0.03291, 0.01457, 0.00579, 0.002, 0.0]
    sigmas = edm_sigmas(20)
    assert len(sigmas) == 21 and sigmas[-1] == 0.0
    for got, want in zip(sigmas[:-1], expected):
        assert math.isclose(got, want, rel_tol=2e-3), (got, want)


def test_preconditioning_follows_edm_with_sigma_data_one_half():
    c_skip, c_out, c_in, c_noise = edm_precondition(2.0)
    assert math.isclose(c_skip, 0.25 / 4.25)
    assert math.isclose(c_out, 1.0 / math.sqrt(4.25))
    assert math.isclose(c_in, 1 / math.sqrt(4.25))
    assert math.isclose(c_noise, 0.25 * math.log(2.0))


def test_twenty_steps_take_39_evaluations_and_a_constant_denoiser_is_reached_exactly():
    target = torch.randn(1, 3, 8, 8)
    calls = []

    def denoise(x, sigma, out):
        calls.append(sigma)
        return out.copy_(target)

    x = torch.randn(1, 3, 8, 8) * 40
    result = heun_sample(denoise, x, edm_sigmas(20), lambda: torch.empty_like(x))
    assert len(calls) == evaluations(20) == 39
    assert calls[0] == pytest.approx(40.0, rel=1e-6) and calls[-1] == pytest.approx(0.002, rel=1e-5)
    torch.testing.assert_close(result, target, rtol=0, atol=1e-5)


def test_init_noise_starts_from_the_upsampled_lr_and_the_draw_does_not_depend_on_chunks():
    # More than one noise chunk, with a ragged last one.
    lr = torch.rand(1, 3, 150, 160)
    with_lr = initial_state(lr, torch.Generator().manual_seed(5), True, torch.empty_like(lr))
    pure = initial_state(lr, torch.Generator().manual_seed(5), False, torch.empty_like(lr))
    torch.testing.assert_close(with_lr - lr, pure)
    assert pure.std() > 20
    chunks = torch.cat([torch.randn(min(NOISE_CHUNK, lr.numel() - start), generator=g) for g in
                        [torch.Generator().manual_seed(5)] for start in range(0, lr.numel(), NOISE_CHUNK)])
    assert torch.equal(pure.view(-1), chunks * 40.0)


class RecordingInfDiT(InfDiT):
    """Records what the network is fed and returns: to check the preconditioning around it."""

    def embed(self, x):
        self.inputs.append(x)
        return super().embed(x)

    def output(self, h, cond):
        out = super().output(h, cond)
        self.outputs.append(out)
        return out


def test_the_lr_channels_are_scaled_by_c_in_and_d_combines_skip_and_network_output():
    weights = tiny_weights(seed=4)
    net = RecordingInfDiT(TINY)
    net.load_state_dict(weights.net.state_dict())
    net.inputs, net.outputs = [], []
    g = torch.Generator().manual_seed(1)
    lr = torch.rand(1, 3, 4, 8, generator=g) * 2 - 1
    concat_lr = torch.rand(1, 3, 16, 32, generator=g)
    x = torch.randn(1, 3, 16, 32, generator=g)
    placement, sigma = Placement(CPU), 3.0
    c_skip, c_out, c_in, _ = edm_precondition(sigma)
    with torch.inference_mode():
        context = ImageContext(concat_lr, LRContext(net, lr, placement), torch.randn(1, TINY.vector_dim))
        out = evaluate(net, x, sigma, context, plan_schedule(plan_batches(1, 2, 2)), placement, torch.empty_like(x))
    torch.testing.assert_close(net.inputs[0], torch.cat([x, concat_lr], dim=1) * c_in)
    torch.testing.assert_close(out, c_skip * x + c_out * net.outputs[0])


def test_lr_keys_do_not_depend_on_sigma_so_one_context_serves_every_evaluation():
    weights = tiny_weights(seed=4)
    g = torch.Generator().manual_seed(2)
    lr = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
    concat_lr = torch.rand(1, 3, 32, 32, generator=g)
    vector = torch.randn(1, TINY.vector_dim, generator=g)
    placement = Placement(CPU)
    schedule = plan_schedule(plan_batches(2, 2, 1))
    with torch.inference_mode():
        shared = ImageContext(concat_lr, LRContext(weights.net, lr, placement), vector)

        def denoise(shared_map):
            def run(x, sigma, out):
                context = shared if shared_map else ImageContext(concat_lr, LRContext(weights.net, lr, placement),
                                                                 vector)
                return evaluate(weights.net, x, sigma, context, schedule, placement, out)
            return run

        start = torch.randn(1, 3, 32, 32, generator=g) * 40
        once = heun_sample(denoise(True), start.clone(), edm_sigmas(3), lambda: torch.empty_like(start))
        fresh = heun_sample(denoise(False), start.clone(), edm_sigmas(3), lambda: torch.empty_like(start))
    assert torch.equal(once, fresh)


@pytest.fixture(scope="module")
def tiny():
    return tiny_weights(seed=6)


@pytest.fixture(scope="module")
def image():
    return torch.rand(1, 3, 20, 28, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def full_sample(one_cpu_thread, tiny, image):
    """The whole-image reference's sample (not the scheduler with one batch)."""
    return reference_upscale_4x(tiny, image, steps=3, seed=11, init_noise=True)


@pytest.mark.parametrize("n, scan, offload", [(5, "row", False), (1, "row", False), (2, "column", True),
                                              (3, "row", True)])
def test_a_whole_sample_equals_the_whole_image_sample_for_any_block_schedule(tiny, image, full_sample, n, scan,
                                                                             offload):
    out = upscale(tiny, image, UpscaleOptions(scale=4, steps=3, seed=11, batch_blocks=n, scan=scan, offload=offload),
                  CPU)
    assert (out - full_sample).abs().max() <= 1e-5


def test_without_init_noise_the_sample_starts_from_pure_noise(tiny, image):
    reference = reference_upscale_4x(tiny, image, steps=2, seed=11, init_noise=False)
    out = upscale(tiny, image, UpscaleOptions(scale=4, steps=2, seed=11, init_noise=False, batch_blocks=2), CPU)
    assert (out - reference).abs().max() <= 1e-5


def test_the_seed_alone_decides_the_sample(tiny, image, full_sample):
    again = upscale(tiny, image, UpscaleOptions(scale=4, steps=3, seed=11, batch_blocks=2), CPU)
    other = upscale(tiny, image, UpscaleOptions(scale=4, steps=3, seed=12, batch_blocks=2), CPU)
    assert (again - full_sample).abs().max() <= 1e-5
    assert (other - full_sample).abs().max() > 1e-2
