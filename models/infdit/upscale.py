"""Upscale images with Inf-DiT: preparation, block-scheduled Heun sampling, and the result.

One *stage* is one 2x or 4x pass, as in the reference script: the input is padded (not
cropped) to whole blocks, bicubic-upsampled for the concatenated LR channels, fed to layer 0's
cross-attention at 1/4 of the output size, and its unpadded version goes to CLIP; after
sampling the padding is cropped off. Larger factors repeat stages (8 = 4 then 2, 16 = 4 then
4). Images are sampled one at a time; an alpha channel is resized bicubically.

The batch size n of each stage comes from its plan (:mod:`.budget`); if the device still
runs out of memory, the evaluation restarts with n - 1.

**Several ranks** (a :class:`.exchange.RankGroup`): every rank runs this same pipeline on the
same input. A stage's sweep is shared out in stripes (:func:`.schedule.plan_ranks`); each
rank keeps only its band of the sampler's buffers (:class:`.shard.ImageShard`), draws the
noise of its pixels, runs the Heun solve on them with its own schedule (no barrier between
evaluations: the update is per pixel) and exchanges boundary keys as it goes
(:class:`.exchange.BlockExchange`). A stage's bands are then put together: on every rank
when another stage follows, on rank 0 for the result (the other ranks return ``None``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .budget import UpscaleOptions, plan_stage, stage_factors, stage_sizes
from .checkpoint import InfDiTWeights
from .evaluate import ImageContext, LRContext, evaluate
from .preprocess import clip_view, pad_to_multiple, resize_bicubic
from .progress import PreviewCanvas, UpscaleStep
from .sampler import edm_sigmas, evaluations, heun_sample, initial_state
from .exchange import BlockExchange, RankGroup
from .schedule import BlockBatch, HostObserver, Placement, Schedule, plan_ranks
from .shard import ImageShard


class Progress:
    """Counts (evaluation, batch) steps across images and stages; totals change when n does.

    After every batch it tells ``on_progress(done, total)`` and ``on_step`` the whole
    :class:`.progress.UpscaleStep` (which image, pass, evaluation and batch).
    """

    def __init__(self, total: int, on_progress: Callable[[int, int], None] | None,
                 on_step: Callable[[UpscaleStep], None] | None = None, images: int = 1, stages: int = 1):
        self.done, self.total, self._report, self._on_step = 0, total, on_progress, on_step
        self.image, self.images, self.stage, self.stages, self.factor = 1, images, 1, stages, 1

    def step(self, evaluation: int, evaluations: int, batch: int, batches: int) -> None:
        self.done += 1
        if self._report is not None:
            self._report(self.done, self.total)
        if self._on_step is not None:
            self._on_step(UpscaleStep(self.done, self.total, self.image, self.images, self.stage, self.stages,
                                      self.factor, evaluation, evaluations, batch, batches))

    def rewind(self, steps: int, total_change: int) -> None:
        self.done -= steps
        self.total += total_change


class _StageSweep:
    """D(x; sigma) for one stage, block batch by block batch, shared by the images of a batch.

    On out-of-memory the evaluation restarts with n - 1, and the smaller n is kept for the
    remaining evaluations and images; the progress total follows. With several ranks the
    sweep is this rank's part, and running out of memory stops the run (every rank would
    have to change n at once).
    """

    def __init__(self, weights: InfDiTWeights, grid: tuple[int, int], n: int, options: UpscaleOptions,
                 placement: Placement, progress: Progress, check_interrupt: Callable[[], None] | None,
                 images: int, group: RankGroup | None = None, preview: PreviewCanvas | None = None):
        self.weights, self.grid, self.n, self.options = weights, grid, n, options
        self.placement, self.progress, self.check_interrupt = placement, progress, check_interrupt
        self.group, self.preview = group, preview
        self._plan()
        self.evaluations = evaluations(options.steps)
        self.evaluations_left = self.evaluations * images
        self.evaluation = 0
        """Evaluations started in this image's solve."""
        self.context: ImageContext | None = None
        self.exchange: BlockExchange | None = None

    def _plan(self) -> None:
        ranks, rank = (self.group.ranks, self.group.rank) if self.group is not None else (1, 0)
        self.schedules = plan_ranks(*self.grid, self.n, self.options.scan, self.placement.offload, ranks)
        self.schedule: Schedule = self.schedules[rank]
        block_px = self.weights.net.cfg.block_px
        self.shards = [ImageShard.of(schedule, block_px) for schedule in self.schedules]
        self.shard = self.shards[rank]

    def start(self) -> None:
        """Before an image's solve: a fresh exchange (with several ranks)."""
        self.evaluation = 0
        if self.group is not None:
            self.exchange = BlockExchange(self.group, self.schedule, self.weights.net.cfg, self.weights.net.dtype)

    def finish(self) -> None:
        """After an image's solve: wait for what is still being sent."""
        if self.exchange is not None:
            self.exchange.finish()
            self.exchange = None

    def _batch_done(self, out: torch.Tensor) -> Callable[[int, BlockBatch], None]:
        """After each batch of an evaluation into ``out``: paint the preview, then count it."""
        block_px = self.weights.net.cfg.block_px

        def done(position: int, batch: BlockBatch) -> None:
            if self.preview is not None:
                ys, xs = self.shard.slices(batch)
                self.preview.paint(out[:, :, ys, xs], batch.rows.start * block_px, batch.cols.start * block_px)
            self.progress.step(self.evaluation, self.evaluations, position + 1, len(self.schedule.batches))

        return done

    def __call__(self, x: torch.Tensor, sigma: float, out: torch.Tensor) -> torch.Tensor:
        self.evaluation += 1
        while True:
            done_before = self.progress.done
            try:
                evaluate(self.weights.net, x, sigma, self.context, self.schedule, self.placement, out,
                         self._batch_done(out), self.check_interrupt, self.shard, self.exchange)
                self.evaluations_left -= 1
                return out
            except torch.OutOfMemoryError as error:
                if self.group is not None:
                    raise torch.OutOfMemoryError(
                        f"Inf-DiT ran out of device memory on rank {self.group.rank} ({self.placement.device}) with "
                        f"{self.n} x {self.n} blocks per batch: lower the VRAM budget or enable offloading") from error
                if self.n == 1:
                    raise torch.OutOfMemoryError(
                        "Inf-DiT ran out of device memory even with one block per batch: free memory used by "
                        "other models, enable offloading, or lower the budget's other claims") from error
            self._shrink(self.progress.done - done_before)

    def _shrink(self, batches_done: int) -> None:
        if self.placement.device.type == "cuda":
            torch.cuda.empty_cache()
        old = len(self.schedule.batches)
        self.n -= 1
        self._plan()
        self.progress.rewind(batches_done, (len(self.schedule.batches) - old) * self.evaluations_left)


def _upscale_stage(weights: InfDiTWeights, lr: torch.Tensor, factor: int, sweep: _StageSweep,
                   generator: torch.Generator, last: bool = True) -> torch.Tensor | None:
    """One 2x/4x pass of a ``[1, 3, h, w]`` image in [-1, 1] (CPU) -> ``[1, 3, h*f, w*f]`` (CPU):
    on every rank, or for the ``last`` stage of several ranks on rank 0 only (else ``None``)."""
    cfg, placement, options, shard = weights.net.cfg, sweep.placement, sweep.options, sweep.shard
    height, width = lr.shape[-2:]
    with placement.host_work():
        padded = pad_to_multiple(lr, cfg.block_px // factor)
        out_h, out_w = padded.shape[-2] * factor, padded.shape[-1] * factor
        # Stored in the model dtype, as the reference does: the network input is cast to it
        # anyway, and the upsampled LR is one of the full-image buffers.
        concat_lr = resize_bicubic(padded, (out_h, out_w)).clamp(-1, 1).to(weights.net.dtype)
        lr_size = (out_h // cfg.lr_scale, out_w // cfg.lr_scale)
        cross_lr = resize_bicubic(padded, lr_size).to(weights.net.dtype)
        clip_lr = resize_bicubic(lr, (height * factor // cfg.lr_scale, width * factor // cfg.lr_scale))
        pixels = clip_view(clip_lr, weights.clip.cfg.image_size)
    vector = weights.clip.encode(pixels)
    image_shape = tuple(concat_lr.shape[:1]) + (3, out_h, out_w)
    if sweep.preview is not None:
        with placement.host_work():
            sweep.preview.start(concat_lr, (height * factor, width * factor), shard.box(out_h, out_w))
    sweep.context = ImageContext(placement.to_store(shard.take(concat_lr)),
                                 LRContext(weights.net, cross_lr, placement), vector)
    del concat_lr
    shape = tuple(sweep.context.concat_lr.shape)
    x = initial_state(sweep.context.concat_lr, generator, options.init_noise,
                      placement.empty_store(shape, torch.float32), placement.host_work, shard=shard)
    sweep.start()
    try:
        sample = heun_sample(sweep, x, edm_sigmas(options.steps),
                             lambda: placement.empty_store(shape, torch.float32))
        sweep.finish()
    finally:
        sweep.context, sweep.exchange = None, None
    if sweep.group is not None:
        sample = sweep.group.assemble(sample, sweep.shards, image_shape, everywhere=not last)
        if sample is None:
            return None
    with placement.host_work():
        return sample[..., :height * factor, :width * factor].clamp(-1, 1).cpu()


def upscale(weights: InfDiTWeights, images: torch.Tensor, options: UpscaleOptions, device: torch.device,
            on_progress: Callable[[int, int], None] | None = None,
            check_interrupt: Callable[[], None] | None = None,
            observer: HostObserver | None = None, group: RankGroup | None = None,
            on_step: Callable[[UpscaleStep], None] | None = None,
            preview: PreviewCanvas | None = None) -> torch.Tensor | None:
    """``[B, C, H, W]`` images in [0, 1] (C = 3, or 4 with alpha) -> ``[B, C, H*scale, W*scale]``.

    ``on_progress(done, total)`` counts (network evaluation, block batch) steps and ``on_step``
    gets each step's :class:`.progress.UpscaleStep` (image, pass, evaluation, batch);
    ``preview`` is painted with the prediction of each batch before they are told (it does not
    change the result). ``check_interrupt`` is called before every block batch and may raise to
    stop. With a ``group`` of several ranks, every rank calls this with the same arguments (its
    own ``device``); progress counts this rank's batches, its preview holds its own band, and
    only rank 0 returns the images (the others ``None``).
    """
    if weights.clip is None:
        raise ValueError("Inf-DiT needs its CLIP image encoder (OpenCLIP ViT-L/14): the checkpoint has none, "
                         "so load one from a separate file")
    if images.dim() != 4 or images.shape[1] not in (3, 4):
        raise ValueError(f"expected images [B, 3 or 4 channels, H, W], got shape {tuple(images.shape)}")
    if min(images.shape[-2:]) < 1 or images.shape[0] < 1:
        raise ValueError(f"empty image batch {tuple(images.shape)}")
    factors = stage_factors(options.scale)
    placement = Placement(torch.device(device), options.offload, observer)
    sizes = stage_sizes(weights, tuple(images.shape[-2:]), factors)
    block_px, count = weights.net.cfg.block_px, images.shape[0]
    ranks = group.ranks if group is not None else 1
    progress = Progress(0, on_progress, on_step, count, len(factors))
    sweeps = [_StageSweep(weights, (height // block_px, width // block_px),
                          plan_stage(weights, height, width, options, ranks).n, options, placement, progress,
                          check_interrupt, count, group, preview) for height, width in sizes]
    progress.total = sum(len(sweep.schedule.batches) * sweep.evaluations_left for sweep in sweeps)
    generator = torch.Generator().manual_seed(options.seed)
    results = []
    with torch.inference_mode():
        for index, image in enumerate(images.float().cpu()):
            with placement.host_work():
                rgb = image[None, :3] * 2 - 1
            for stage, (factor, sweep) in enumerate(zip(factors, sweeps)):
                progress.image, progress.stage, progress.factor = index + 1, stage + 1, factor
                rgb = _upscale_stage(weights, rgb, factor, sweep, generator, last=stage == len(factors) - 1)
            if rgb is None:
                continue
            with placement.host_work():
                result = (rgb + 1) / 2
                if image.shape[0] == 4:
                    alpha = resize_bicubic(image[None, 3:], tuple(result.shape[-2:])).clamp(0, 1)
                    result = torch.cat([result, alpha], dim=1)
                results.append(result)
    if not results:
        return None
    with placement.host_work():
        return torch.cat(results)
