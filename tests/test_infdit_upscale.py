"""Upscaling images: any size, alpha, batches, 2x/4x and repeated stages, progress, interruption."""

from __future__ import annotations

import pytest
import torch

from ultrares.models.infdit.budget import UpscaleOptions
from ultrares.models.infdit.preprocess import pad_to_multiple, resize_bicubic
from ultrares.models.infdit.tiny import tiny_weights
from ultrares.models.infdit.upscale import upscale

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

CPU = torch.device("cpu")
FAST = dict(steps=2, seed=1)


@pytest.fixture(scope="module")
def weights():
    return tiny_weights(seed=9)


@pytest.mark.parametrize("scale, size, expected", [(4, (13, 22), (52, 88)), (2, (13, 9), (26, 18)),
                                                   (8, (5, 7), (40, 56)), (16, (3, 2), (48, 32))])
def test_any_size_is_padded_to_whole_blocks_and_cropped_back(weights, scale, size, expected):
    out = upscale(weights, torch.rand(1, 3, *size), UpscaleOptions(scale=scale, **FAST), CPU)
    assert out.shape == (1, 3, *expected)
    assert 0 <= out.min() and out.max() <= 1


def test_padding_mirrors_the_border_and_replicates_when_the_image_is_too_small():
    image = torch.arange(12.0).view(1, 1, 3, 4)
    padded = pad_to_multiple(image, 5)
    assert padded.shape == (1, 1, 5, 5)
    assert torch.equal(padded[..., :3, :4], image)
    assert torch.equal(padded[0, 0, 3, :4], image[0, 0, 1])  # mirrored, not repeated
    assert pad_to_multiple(torch.zeros(1, 1, 1, 1), 4).shape == (1, 1, 4, 4)


def test_the_alpha_channel_is_resized_and_kept(weights):
    image = torch.rand(1, 4, 8, 12)
    out = upscale(weights, image, UpscaleOptions(scale=4, **FAST), CPU)
    assert out.shape == (1, 4, 32, 48)
    torch.testing.assert_close(out[:, 3:], resize_bicubic(image[:, 3:], (32, 48)).clamp(0, 1))
    rgb_only = upscale(weights, image[:, :3], UpscaleOptions(scale=4, **FAST), CPU)
    assert torch.equal(out[:, :3], rgb_only)


def test_a_batch_is_upscaled_image_by_image(weights):
    images = torch.rand(2, 3, 8, 8)
    both = upscale(weights, images, UpscaleOptions(scale=4, **FAST), CPU)
    first = upscale(weights, images[:1], UpscaleOptions(scale=4, **FAST), CPU)
    assert both.shape == (2, 3, 32, 32)
    assert torch.equal(both[:1], first)
    assert not torch.equal(both[0], both[1])


def test_progress_counts_every_evaluation_and_batch_up_to_the_total(weights):
    reports = []
    upscale(weights, torch.rand(2, 3, 8, 12), UpscaleOptions(scale=4, steps=3, batch_blocks=1), CPU,
            on_progress=lambda done, total: reports.append((done, total)))
    total = 2 * 5 * 6  # images x evaluations (2 * 3 - 1) x blocks (2 x 3 grid, one per batch)
    assert reports == [(done, total) for done in range(1, total + 1)]


def test_an_interrupt_between_batches_stops_the_work(weights):
    class Cancelled(Exception):
        pass

    reports = []

    def check_interrupt():
        if len(reports) >= 4:
            raise Cancelled

    with pytest.raises(Cancelled):
        upscale(weights, torch.rand(1, 3, 8, 12), UpscaleOptions(scale=4, steps=3, batch_blocks=1), CPU,
                on_progress=lambda done, total: reports.append(done), check_interrupt=check_interrupt)
    assert reports == [1, 2, 3, 4]


def test_bad_inputs_are_refused_with_the_reason(weights):
    with pytest.raises(ValueError, match="3 or 4 channels"):
        upscale(weights, torch.rand(1, 2, 8, 8), UpscaleOptions(), CPU)
    with pytest.raises(ValueError, match=r"scale must be one of \[2, 4, 8, 16\]"):
        upscale(weights, torch.rand(1, 3, 8, 8), UpscaleOptions(scale=3), CPU)
    without_clip = tiny_weights(seed=9, clip_cfg=None)
    with pytest.raises(ValueError, match="CLIP image encoder"):
        upscale(without_clip, torch.rand(1, 3, 8, 8), UpscaleOptions(), CPU)
