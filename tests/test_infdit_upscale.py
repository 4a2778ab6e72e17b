"""Upscaling images: any size, alpha, batches, 2x/4x and repeated stages, progress (what it counts,
the preview of the image being built), interruption."""

from __future__ import annotations

import pytest
import torch

from ultrares.models.infdit.budget import UpscaleOptions
from ultrares.models.infdit.preprocess import pad_to_multiple, resize_bicubic
from ultrares.models.infdit.schedule import plan_batches
from ultrares.models.infdit.progress import PreviewCanvas, PreviewMosaic, UpscaleStep, encode_piece, preview_factor
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


def test_each_step_says_which_image_pass_evaluation_and_batch_it_is(weights):
    steps: list[UpscaleStep] = []
    # 8x = a 4x pass (4x6 -> padded 4x8 -> 16x32 output, 1 x 2 blocks) then a 2x pass (16x24 -> 32x48, 2 x 3
    # blocks); 2 Heun steps = 3 evaluations; one block per batch.
    upscale(weights, torch.rand(2, 3, 4, 6), UpscaleOptions(scale=8, steps=2, batch_blocks=1), CPU,
            on_step=steps.append)
    expected = [(image, stage, factor, evaluation, batch, batches)
                for image in (1, 2) for stage, factor, batches in ((1, 4, 2), (2, 2, 6))
                for evaluation in (1, 2, 3) for batch in range(1, batches + 1)]
    assert [(s.image, s.stage, s.factor, s.evaluation, s.batch, s.batches) for s in steps] == expected
    assert {(s.images, s.stages, s.evaluations) for s in steps} == {(2, 2, 3)}
    assert [(s.done, s.total) for s in steps] == [(done, len(expected)) for done in range(1, len(expected) + 1)]
    assert steps[-1].describe() == "image 2/2 · pass 2/2 (2×) · evaluation 3/3 · batch 6/6"
    single = UpscaleStep(done=3, total=351, image=1, images=1, stage=1, stages=1, factor=4, evaluation=12,
                         evaluations=39, batch=3, batches=9)
    assert single.describe() == "evaluation 12/39 · batch 3/9"


def test_the_preview_is_the_image_being_built_batch_by_batch_and_changes_nothing(weights):
    image, options = torch.rand(1, 3, 8, 12), UpscaleOptions(scale=4, steps=2, batch_blocks=1)
    canvas, pictures = PreviewCanvas(weights.net.cfg.block_px), []
    out = upscale(weights, image, options, CPU, preview=canvas,
                  on_step=lambda step: pictures.append(canvas.image().clone()))
    assert torch.equal(out, upscale(weights, image, options, CPU))
    # It starts as the upsampled input; each batch repaints its own 16-px block only.
    start = ((resize_bicubic(image * 2 - 1, (32, 48)).clamp(-1, 1)[0] + 1) * 127.5).round().to(torch.uint8)
    blocks = [(batch.rows.start, batch.cols.start) for batch in plan_batches(2, 3, 1, "auto")] * 3
    before = start.permute(1, 2, 0)
    for picture, (row, col) in zip(pictures, blocks):
        changed = (picture != before).any(-1).nonzero()
        assert changed.numel() == 0 or ((changed // 16) == torch.tensor([row, col])).all()
        before = picture
    # At the end it is the finished image (the last evaluation's prediction is the result).
    finished = (out[0] * 255).permute(1, 2, 0)
    assert (pictures[-1].float() - finished).abs().max() <= 1


def test_a_preview_is_downsampled_by_a_power_of_two_that_divides_the_block():
    assert preview_factor(512, 512, 128) == 1 and preview_factor(4096, 2048, 128) == 8
    assert preview_factor(16384, 16384, 128) == 32 and preview_factor(1 << 20, 64, 128) == 128
    canvas = PreviewCanvas(block_px=16, side=8)
    canvas.start(torch.zeros(1, 3, 32, 48), size=(30, 45))
    assert canvas.factor == 8 and canvas.image().shape == (4, 6, 3)  # 48 / 8 = 6 <= side; cropped to 30x45
    canvas.paint(torch.ones(1, 3, 16, 16), 16, 32)
    assert (canvas.image()[2:, 4:] == 255).all() and (canvas.image()[:2] == 128).all()


def test_the_ranks_bands_of_the_preview_are_put_together_on_the_host():
    whole, bands = PreviewCanvas(16), [PreviewCanvas(16), PreviewCanvas(16)]
    lr, painted = torch.rand(1, 3, 32, 48) * 2 - 1, torch.rand(1, 3, 32, 48) * 2 - 1
    whole.start(lr, (30, 40))
    whole.paint(painted, 0, 0)
    mosaic = PreviewMosaic()
    for canvas, (top, height) in zip(bands, ((0, 16), (16, 16))):
        canvas.start(lr, (30, 40), own=(top, 0, height, 48))
        canvas.paint(painted[:, :, top:top + height], top, 0)
        mosaic.put(encode_piece(canvas))
    assert torch.equal(mosaic.image(), whole.image())
    later = PreviewCanvas(16)
    for _ in range(2):
        later.start(lr[..., :16, :16], (16, 16))
    mosaic.put(encode_piece(later))  # a later stage starts a new picture
    assert mosaic.image().shape == (16, 16, 3)
    mosaic.put(encode_piece(bands[0]))  # and an earlier stage's piece no longer counts
    assert mosaic.image().shape == (16, 16, 3)


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
