"""CLEAR distillation: fine-tune the attention projections of a Flux so that it works with
CLEAR's circular-window attention, the teacher being the same model with full attention.

It follows the reference's ``distill.py`` (Huage001/CLEAR):

- Data: samples the teacher made itself (the reference trains on 10K FLUX.1-dev images; here
  each sample is one of the teacher's own trajectories, kept in a :class:`SampleStore`). A
  training point takes a sample ``x0``, a noise level ``sigma`` drawn uniformly from
  ``{1/1000, ..., 1}`` (the reference's uniform timestep over FLUX's 1000 training steps, no
  shift) and fresh noise: ``x = (1 - sigma) x0 + sigma noise``.
- Losses, on the model's velocity prediction ``v`` (its raw output):

  * flow matching: ``mean((v_student - (noise - x0))**2)``,
  * prediction distillation: ``mean((v_student - v_teacher)**2)`` at the same point,
  * attention distillation: the mean over the distilled layers of
    ``mean((a_student - a_teacher)**2)``, ``a`` being a single block's attention output over
    the whole ``[text | image]`` sequence (before the block's output projection); the layers
    are the single blocks whose attention processor is every 4th of the model's
    (:func:`attention_loss_blocks`: single blocks 1, 5, ..., 37 of FLUX.1),

  weighted ``1, 0.5, 0.5``: ``loss = fm + 0.5 pred + 0.5 attn``. The student's attention
  outputs are those of its own forward pass, so every term back-propagates through the whole
  student. The host recomputes each block in the backward pass (as the reference's
  ``--gradient_checkpointing``): the backward then runs one block at a time and each layer's
  attention term enters when it reaches that layer, so the memory peak is one block's graph
  plus each block's inputs, whatever the depth.
- Trained: exactly the tensors of a released file (:class:`~.student.ClearStudent`), with
  AdamW and gradient clipping at 1.

A batch of ``n`` samples is ``n`` forward/backward passes whose gradients add up (each term
divided by ``n``): the gradients of the reference's batch mean, with one sample's memory.
The loop itself is the pack's shared one (:func:`ultrares.models.training.train`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import NamedTuple, Protocol

import torch

from ..training import TOTAL, OffloadedAdamW, euler_sample, train
from .student import ClearStudent
from .weights import Block

FLOW_MATCHING, PREDICTION, ATTENTION = "flow matching", "prediction", "attention"
ATTENTION_EVERY = 4      # the reference distils the attention of every 4th processor (single blocks only)
TRAIN_TIMESTEPS = 1000   # FLUX's training timesteps: sigma is drawn from {1, 2, ..., 1000} / 1000


def attention_loss_blocks(depth: int, depth_single: int) -> list[Block]:
    """The layers whose attention output is distilled: the reference enumerates the attention
    processors (double blocks first, then single) and marks ``'single' in name and index % 4 == 0``,
    i.e. single block ``j`` when ``(depth + j) % 4 == 0``: 1, 5, ..., 37 for FLUX.1 (19 + 38 blocks)."""
    return [("single", j) for j in range(depth_single) if (depth + j) % ATTENTION_EVERY == 0]


@dataclass
class ClearDistillSettings:
    """One CLEAR distillation run's settings (the node's and the command line's inputs)."""

    steps: int = 1000                 # optimiser steps in this run
    learning_rate: float = 1e-4       # the reference's AdamW default
    batch_size: int = 1               # teacher samples per optimiser step
    samples: int = 1000               # teacher samples in the pool (the paper: 10K)
    flow_matching_weight: float = 1.0
    prediction_weight: float = 0.5
    attention_weight: float = 0.5
    seed: int = 0
    save_every: int = 100             # also saved at the end and when stopped early
    max_grad_norm: float = 1.0
    weight_decay: float = 1e-4        # the reference's AdamW weight decay
    optimizer_on_cpu: bool = False    # AdamW's float32 state in host memory (OffloadedAdamW)


@dataclass
class ClearTrainingRecord:
    """How far distillation got: total optimiser steps, each loss term per step, last run's settings."""

    steps: int = 0
    losses: dict[str, list[float]] = field(default_factory=dict)
    finished: bool = False
    settings: dict = field(default_factory=dict)

    def log(self, losses: Mapping[str, float]) -> None:
        """Append one step's loss terms."""
        for name, value in losses.items():
            self.losses.setdefault(name, []).append(value)


class Prediction(NamedTuple):
    """One forward pass: the velocity (the model's raw output) and the distilled layers' attention."""

    velocity: torch.Tensor
    attention: dict[Block, torch.Tensor]


class ClearDistillHost(Protocol):
    """What the loop needs from the model being distilled."""

    prompt_count: int

    def sigmas(self) -> torch.Tensor:
        """Noise levels of the teacher's sampling trajectories, descending, ending at 0."""

    def start(self, seed: int) -> torch.Tensor:
        """The noisy latent at ``sigmas()[0]`` a trajectory starts from (one sample)."""

    def guided(self, x: torch.Tensor, sigma: torch.Tensor, prompt: int) -> torch.Tensor:
        """The teacher's denoised prediction as its sampler uses it (with CFG); no gradients."""

    def teacher(self, x: torch.Tensor, sigma: torch.Tensor, prompt: int, blocks: list[Block]) -> Prediction:
        """The teacher's (full attention) velocity for ``prompt`` alone and the attention outputs
        of ``blocks``; no gradients."""

    def student(self, x: torch.Tensor, sigma: torch.Tensor, prompt: int, blocks: list[Block],
                student: ClearStudent) -> Prediction:
        """The same with CLEAR attention and the student's tensors, differentiable w.r.t. them."""


class SampleStore(Protocol):
    """Where the teacher's samples are kept between steps (and, on disk, between runs):
    :mod:`.samples`."""

    def get(self, index: int) -> torch.Tensor | None:
        """Sample ``index``, or None if it was not made yet."""

    def put(self, index: int, latent: torch.Tensor) -> None:
        """Keep sample ``index``."""


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` (the same on every machine and run)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_prompt(index: int, prompt_count: int) -> int:
    """The prompt of teacher sample ``index``: the prompts in turn."""
    return index % prompt_count


def teacher_sample(host: ClearDistillHost, index: int, seed: int,
                   check_interrupt: Callable[[], None] | None = None) -> torch.Tensor:
    """Teacher sample ``index``: the end of its own trajectory (Euler, with its guidance) from noise
    drawn from ``(seed, index)``, for prompt ``index % prompt_count``."""
    prompt = sample_prompt(index, host.prompt_count)
    with torch.no_grad():
        return euler_sample(lambda x, sigma: host.guided(x, sigma, prompt), host.start(derived_seed(seed, "sample", index)),
                            host.sigmas(), check_interrupt)


def pool_index(position: int, pool: int, seed: int) -> int:
    """Which sample the ``position``-th draw takes: every sample once per epoch, in an order
    shuffled per epoch (as the reference's shuffling data loader)."""
    epoch, offset = divmod(position, pool)
    order = torch.randperm(pool, generator=torch.Generator().manual_seed(derived_seed(seed, "epoch", epoch)))
    return int(order[offset])


def training_point(x0: torch.Tensor, seed: int, position: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, sigma, noise)`` for the ``position``-th draw: ``sigma`` uniform on ``{1, ..., 1000}/1000``,
    ``x = (1 - sigma) x0 + sigma noise`` (flow matching's straight path)."""
    generator = torch.Generator().manual_seed(derived_seed(seed, "point", position))
    index = int(torch.rand((), generator=generator) * TRAIN_TIMESTEPS)
    sigma = torch.tensor((TRAIN_TIMESTEPS - index) / TRAIN_TIMESTEPS, dtype=torch.float32)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
    return (1 - sigma) * x0 + sigma * noise, sigma, noise


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference in float32."""
    return (a.float() - b.float()).pow(2).mean()


def attention_loss(student: Mapping[Block, torch.Tensor], teacher: Mapping[Block, torch.Tensor]) -> torch.Tensor:
    """Mean over the distilled layers of each layer's mean squared attention-output difference."""
    if set(student) != set(teacher) or not student:
        raise RuntimeError(f"attention outputs of different layers: student {sorted(student)}, teacher {sorted(teacher)}")
    return torch.stack([mse(student[block], teacher[block]) for block in sorted(teacher)]).mean()


def make_optimizer(student: ClearStudent, settings: ClearDistillSettings) -> torch.optim.Optimizer | OffloadedAdamW:
    """The reference's AdamW (betas 0.9/0.999, eps 1e-8, its weight decay) over every student
    tensor; with ``optimizer_on_cpu`` its float32 values and state live in host memory, and the
    student's tensors on the device are only what the forward pass uses."""
    options = dict(lr=settings.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=settings.weight_decay)
    if settings.optimizer_on_cpu:
        return OffloadedAdamW(student.by_key(), **options)
    return torch.optim.AdamW(student.parameters(), **options)


def optimized_tensors(student: ClearStudent, optimizer: torch.optim.Optimizer | OffloadedAdamW
                      ) -> dict[str, torch.nn.Parameter]:
    """The float32 tensors ``optimizer`` updates, by file key: the student's own, or the host masters."""
    return dict(optimizer.masters) if isinstance(optimizer, OffloadedAdamW) else student.by_key()


def distill(host: ClearDistillHost, student: ClearStudent, settings: ClearDistillSettings, samples: SampleStore,
            record: ClearTrainingRecord | None = None,
            save: Callable[[ClearTrainingRecord], None] | None = None,
            on_progress: Callable[[int, int], None] | None = None,
            check_interrupt: Callable[[], None] | None = None,
            optimizer: torch.optim.Optimizer | OffloadedAdamW | None = None) -> ClearTrainingRecord:
    """Train ``student`` in place for ``settings.steps`` steps, continuing ``record`` (resume).

    Every draw (sample, noise level, noise) follows from the seed and the step count, so a run
    resumed from a save (with its optimiser state, see :mod:`ultrares.models.training`) goes on
    exactly like one that never stopped. ``save(record)`` is called every ``save_every`` steps,
    at the end, and when anything stops the run after at least one step (the exception is then
    re-raised), so a cancelled run leaves a usable file.
    """
    if settings.batch_size < 1 or settings.samples < 1:
        raise ValueError(f"batch size and samples must be >= 1, got {settings.batch_size} and {settings.samples}")
    record = record or ClearTrainingRecord()
    record.settings = asdict(settings)
    blocks = attention_loss_blocks(student.depth, student.depth_single) if settings.attention_weight > 0 else []
    if settings.attention_weight > 0 and not blocks:
        raise ValueError(f"a Flux with {student.depth} double and {student.depth_single} single blocks has no layer "
                         "the reference distils the attention of (every 4th attention, single blocks only): set the "
                         "attention weight to 0")
    device = next(student.parameters()).device
    weights = {FLOW_MATCHING: settings.flow_matching_weight, PREDICTION: settings.prediction_weight,
               ATTENTION: settings.attention_weight}

    def sample(index: int) -> torch.Tensor:
        latent = samples.get(index)
        if latent is None:
            latent = teacher_sample(host, index, settings.seed, check_interrupt).to("cpu")
            samples.put(index, latent)
        return latent.to(device, torch.float32)

    def step() -> dict[str, torch.Tensor]:
        sums: dict[str, torch.Tensor] = {}
        for b in range(settings.batch_size):
            position = record.steps * settings.batch_size + b
            index = pool_index(position, settings.samples, settings.seed)
            x0 = sample(index)
            x, sigma, noise = training_point(x0, settings.seed, position)
            prompt = sample_prompt(index, host.prompt_count)
            with torch.no_grad():
                teacher = host.teacher(x, sigma, prompt, blocks)
            predicted = host.student(x, sigma, prompt, blocks, student)
            terms = {FLOW_MATCHING: mse(predicted.velocity, noise - x0),
                     PREDICTION: mse(predicted.velocity, teacher.velocity)}
            if blocks:
                terms[ATTENTION] = attention_loss(predicted.attention, teacher.attention)
            total = sum(weights[name] * value for name, value in terms.items())
            (total / settings.batch_size).backward()
            for name, value in {**terms, TOTAL: total}.items():
                sums[name] = sums.get(name, 0) + value.detach() / settings.batch_size
        return sums

    student.train().requires_grad_(True)
    optimizer = optimizer or make_optimizer(student, settings)
    try:
        return train(step, optimized_tensors(student, optimizer).values(), optimizer, record, settings.steps,
                     settings.save_every, settings.max_grad_norm, save=save, on_progress=on_progress,
                     check_interrupt=check_interrupt)
    finally:
        student.eval().requires_grad_(False)
