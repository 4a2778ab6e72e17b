"""The teacher's own sampler, for the data a distillation trains on: Euler steps on the host's
sigma schedule (``x`` moves along the straight line to the denoised prediction)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def euler_step(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """``x`` at ``sigma_next`` after one Euler step from ``sigma`` (``denoised`` itself at 0)."""
    return x + (x - denoised) / sigma * (sigma_next - sigma)


def euler_sample(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                 sigmas: torch.Tensor, check_interrupt: Callable[[], None] | None = None) -> torch.Tensor:
    """The end of the Euler trajectory from ``x`` at ``sigmas[0]`` down to ``sigmas[-1]``."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        if check_interrupt is not None:
            check_interrupt()
        x = euler_step(x, denoise(x, sigma), sigma, sigma_next)
    return x
