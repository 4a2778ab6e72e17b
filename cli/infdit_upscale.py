"""Upscale an image with Inf-DiT from the command line: on one device, or shared by many
processes on many machines under ``torchrun`` (the block schedule of the ComfyUI node; no
ComfyUI needed).

One process (a GPU if there is one, else the CPU); ``--tiny 0`` runs the built-in tiny model
with random weights, no download:

    python custom_nodes/ComfyUI-UltraRes/cli/infdit_upscale.py in.png out.png --scale 4 \\
        --checkpoint models/infdit/infdit.safetensors

Several GPUs on several machines: the same command on every machine, each process one rank
(one GPU), rank 0 writes the image:

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint host0:29500 \\
        custom_nodes/ComfyUI-UltraRes/cli/infdit_upscale.py in.png out.png --scale 16 \\
        --checkpoint models/infdit/infdit.safetensors --vram-budget-gb 24

Every rank reads the input image and the weights itself, so both paths must exist on every
machine. Where the pack is installed, ``python -m ultrares.cli.infdit_upscale`` (and
``torchrun ... -m ultrares.cli.infdit_upscale``) does the same.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run by path: run as ultrares.cli.infdit_upscale
    import _pack

    _pack.run(__file__)

import argparse
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from ..models.infdit import DTYPES

REPORT_SECONDS = 10.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cli/infdit_upscale.py", description=__doc__.split("\n\n")[0],
                                epilog="See the module docstring for examples.")
    p.add_argument("input", type=Path, help="image to upscale (PNG, JPEG, ...; an alpha channel is resized)")
    p.add_argument("output", type=Path, help="where rank 0 writes the result (8-bit; format from the extension)")
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", help="released mp_rank_00_model_states.pt or a converted .safetensors")
    weights.add_argument("--tiny", type=int, metavar="SEED", help="the built-in tiny model with random weights")
    p.add_argument("--clip", help="separate OpenCLIP ViT-L/14 DataComp-XL weights, if the checkpoint has none")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="weights and compute (auto: bf16 on GPUs that support it, else fp16 on GPUs, fp32 on the CPU)")
    p.add_argument("--scale", type=int, choices=(2, 4, 8, 16), default=4)
    p.add_argument("--steps", type=int, default=20, help="Heun steps (20 as released: 39 network evaluations)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-init-noise", action="store_true", help="start from pure noise, not the upsampled input")
    p.add_argument("--vram-budget-gb", type=float, default=0.0,
                   help="device memory per rank, weights included (0: what is free on the device)")
    p.add_argument("--offload", action="store_true", help="keep the neighbour-key strip and image buffers in RAM")
    p.add_argument("--scan", choices=("auto", "row", "column"), default="auto")
    p.add_argument("--batch-blocks", type=int, help="blocks per batch side (default: from the budget)")
    p.add_argument("--device", help="this process's device (default: cuda:LOCAL_RANK with GPUs, else cpu)")
    return p.parse_args(argv)


def _device(args: argparse.Namespace):
    import torch

    if args.device:
        return torch.device(args.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def _dtype(choice: str, device) -> str:
    import torch

    if choice != "auto":
        return choice
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def read_image(path: Path):
    """``[1, C, H, W]`` in [0, 1]: RGB, or RGBA when the file has transparency."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as image:
        alpha = image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info)
        pixels = np.asarray(image.convert("RGBA" if alpha else "RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].contiguous()


def write_image(image, path: Path) -> None:
    """An ``[1, C, H, W]`` image in [0, 1] as an 8-bit file (format from the extension), written
    atomically: a run stopped while writing leaves no half image."""
    from PIL import Image

    from ..models import write_atomically

    pixels = (image[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    with write_atomically(path) as partial:
        Image.fromarray(pixels).save(partial, format=Image.registered_extensions()[path.suffix.lower()])


class _Report:
    """Prints progress now and then (every 5 % or :data:`REPORT_SECONDS`)."""

    def __init__(self) -> None:
        self.started = self.last = time.monotonic()
        self.shown = -1.0

    def __call__(self, done: int, total: int) -> None:
        now, share = time.monotonic(), done / total if total else 1.0
        if share - self.shown >= 0.05 or now - self.last >= REPORT_SECONDS or done == total:
            print(f"{done}/{total} block batches ({share:.0%}), {now - self.started:.0f} s", flush=True)
            self.shown, self.last = share, now


def run(args: argparse.Namespace) -> int:
    """Upscale ``args.input`` into ``args.output``; returns the exit status."""
    import torch
    import torch.distributed as dist

    from ..models.infdit import (GiB, BudgetTooSmall, InfDiTCheckpointError, UpscaleOptions, WeightSource,
                                 allocator_headroom, host_free_bytes, join, plan_budget, upscale, upscale_job)

    device = _device(args)
    source = WeightSource(path=args.checkpoint, clip_path=args.clip, dtype=_dtype(args.dtype, device),
                          tiny_seed=args.tiny)
    options = UpscaleOptions(scale=args.scale, steps=args.steps, seed=args.seed, init_noise=not args.no_init_noise,
                             budget_bytes=args.vram_budget_gb * GiB if args.vram_budget_gb > 0 else None,
                             batch_blocks=args.batch_blocks, scan=args.scan, offload=args.offload,
                             margin=allocator_headroom(device))
    try:
        image = read_image(args.input)
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            weights = source.load()
            weights.net.to(device)
            if weights.clip is not None:
                weights.clip.to(device)
            free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else host_free_bytes()
            plan = plan_budget(weights, tuple(image.shape[-2:]), options, free)
            print(plan.describe(tuple(image.shape[-2:]), image.shape[0]), flush=True)
            for _, message in plan.messages:
                print(message, flush=True)
            out = upscale(weights, image, plan.options, device, on_progress=_Report())
        else:
            store, rank, ranks = next(dist.rendezvous("env://"))
            group = join(store, rank, ranks, device)
            if rank == 0:
                group.on_progress = _Report()
                group.on_plan = lambda messages: [print(message, flush=True) for _, message in messages]
            out = upscale_job(group, weights=asdict(source), images=image, options=asdict(options), preview=False)
            if group.on_progress is not None:
                group.on_progress(group.total, group.total)  # the other ranks' last batches
            group.close()
    except (BudgetTooSmall, InfDiTCheckpointError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if out is not None:
        write_image(out, args.output)
        print(f"wrote {args.output} ({out.shape[-1]}x{out.shape[-2]})", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and upscale; returns the exit status (1 with the reason when refused)."""
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
