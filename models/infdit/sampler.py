"""EDM preconditioning, the sigma schedule and the deterministic Heun sampler of Inf-DiT.

The released sampler (``ConcatSRHeunEDMSampler``) runs EDM's Algorithm 1 without churn over
20 Karras sigmas from 40 to 0.002 plus a final 0, skipping the Heun correction on the last
step: 39 network evaluations. Here the maths runs in fp32 (the reference ran it in bf16) on
preallocated full-image buffers updated in place, so no image-sized temporaries appear.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, ContextManager

import torch

if TYPE_CHECKING:
    from .shard import ImageShard

SIGMA_DATA = 0.5
SIGMA_MIN = 0.002
SIGMA_MAX = 40.0
RHO = 7.0
NOISE_CHUNK = 1 << 16

Denoiser = Callable[[torch.Tensor, float, torch.Tensor], torch.Tensor]
"""``(x, sigma, out) -> out``: writes the denoised image D(x; sigma) into ``out``."""


def edm_precondition(sigma: float) -> tuple[float, float, float, float]:
    """``(c_skip, c_out, c_in, c_noise)`` for ``sigma_data = 0.5``."""
    total = sigma ** 2 + SIGMA_DATA ** 2
    return SIGMA_DATA ** 2 / total, sigma * SIGMA_DATA / math.sqrt(total), 1 / math.sqrt(total), 0.25 * math.log(sigma)


def edm_sigmas(steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO) -> list[float]:
    """Karras et al.'s schedule in fp32 (as the reference computes it) with a final 0."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    ramp = torch.linspace(0, 1, steps)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return ((max_inv + ramp * (min_inv - max_inv)) ** rho).tolist() + [0.0]


def evaluations(steps: int) -> int:
    """Network evaluations of a Heun solve: two per step, one on the last (it ends at sigma 0)."""
    return 2 * steps - 1


def initial_state(concat_lr: torch.Tensor, generator: torch.Generator, init_noise: bool, out: torch.Tensor,
                  host_work: Callable[[], ContextManager[None]] = contextlib.nullcontext,
                  sigma_max: float = SIGMA_MAX, shard: ImageShard | None = None) -> torch.Tensor:
    """Write x_T into ``out``: ``concat_lr + sigma_max * N(0, I)`` with init-noise, else ``sigma_max * N(0, I)``.

    The noise comes from the CPU ``generator`` in fixed-size chunks (no image-sized temporary),
    so it depends on the seed and the image size only, never on how the image is later cut
    into block batches. ``host_work`` wraps the chunk arithmetic, which happens on the host.
    With a ``shard`` (``out`` and ``concat_lr`` then hold only its band), the whole image's
    noise is drawn all the same and the band's values are kept: every rank gets the values a
    single device would use for its pixels.
    """
    flat, lr_flat = out.view(-1), concat_lr.reshape(-1)
    if shard is None or shard.whole:
        for start in range(0, flat.numel(), NOISE_CHUNK):
            stop = min(start + NOISE_CHUNK, flat.numel())
            with host_work():
                chunk = torch.randn(stop - start, generator=generator) * sigma_max
                if init_noise:
                    chunk += lr_flat[start:stop].cpu()
            flat[start:stop] = chunk
        return out
    image_shape = tuple(out.shape[:-2]) + (shard.grid[0] * shard.block_px, shard.grid[1] * shard.block_px)
    total, kept = math.prod(image_shape), 0
    for start in range(0, total, NOISE_CHUNK):
        stop = min(start + NOISE_CHUNK, total)
        with host_work():
            chunk = torch.randn(stop - start, generator=generator) * sigma_max
            values = chunk[shard.noise_mask(start, stop, image_shape)]
            if init_noise:
                values += lr_flat[kept:kept + values.numel()].cpu()
        flat[kept:kept + values.numel()] = values
        kept += values.numel()
    return out


def heun_sample(denoise: Denoiser, x: torch.Tensor, sigmas: list[float],
                new_buffer: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Solve the probability-flow ODE from ``sigmas[0]`` to 0; ``x`` is overwritten.

    ``new_buffer()`` returns an uninitialised tensor like ``x`` (three are used).
    """
    denoised, slope, x_next = new_buffer(), new_buffer(), new_buffer()
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        dt = sigma_next - sigma
        denoise(x, sigma, denoised)
        slope.copy_(x).sub_(denoised).div_(sigma)
        x_next.copy_(slope).mul_(dt).add_(x)
        if sigma_next > 0:
            denoise(x_next, sigma_next, denoised)
            slope.add_(denoised.neg_().add_(x_next).div_(sigma_next)).div_(2)
            x_next.copy_(slope).mul_(dt).add_(x)
        x, x_next = x_next, x
    return x
