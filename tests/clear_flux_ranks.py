"""What the tiny-Flux gloo tests run inside each rank (``run_ranks`` targets): ComfyUI booted in
the rank's process, the tiny Flux patched by the CLEAR node, its stripe-parallel clone on the
process group, sampled through ComfyUI's KSampler like every other rank."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

import comfy_harness

CASES = [  # latent shape, radius, cfg: odd token grid 7 x 10; batch 2 with cfg (4 rows per call)
    dict(latent=(1, 16, 14, 20), radius=3, cfg=1.0),
    dict(latent=(2, 16, 13, 19), radius=5, cfg=3.0),
]


def _sample(model, latent: tuple[int, ...], cfg: float) -> torch.Tensor:
    cond = comfy_harness.flux_conditioning(batch=latent[0], tokens=7)
    uncond = comfy_harness.flux_conditioning(batch=latent[0], tokens=7, seed=1)
    return comfy_harness.sample(model, cond, uncond, torch.zeros(latent), seed=3, cfg=cfg)


def sample_on_rank(rank: int, world_size: int, comfy_path: str) -> dict[int, list[float]]:
    """For groups of 2 ranks (a subgroup) and of all of them: each case's relative difference
    between this rank's stripe-parallel sample and one device."""
    # The rank starts with the test process's import path, which ComfyUI's boot there has prefixed
    # with comfy/ (whose utils.py would hide ComfyUI's utils package here).
    sys.path[:] = [p for p in sys.path if Path(p).resolve() != (Path(comfy_path) / "comfy").resolve()]
    comfy_harness.boot_comfyui_in_process(Path(comfy_path))
    nodes = comfy_harness.load_pack_entrypoint()
    from ultrares.models.clear.communicator import ProcessGroupCommunicator
    from ultrares.nodes.clear.devices import split_over_process_group

    errors = {}
    for size in (2, world_size):
        group = dist.new_group(list(range(size)))  # every rank takes part in creating every group
        if rank >= size:
            continue
        errors[size] = []
        for case in CASES:
            (clear,) = nodes["UltraResClearPatch"].execute(comfy_harness.tiny_flux_patcher(seed=0), "none",
                                                           case["radius"], 0, 1.0, False, 0, "auto").result
            expected = _sample(clear, case["latent"], case["cfg"])
            out = _sample(split_over_process_group(clear, ProcessGroupCommunicator(group)), case["latent"],
                          case["cfg"])
            errors[size].append(float((out - expected).abs().max() / expected.abs().max()))
    return errors
