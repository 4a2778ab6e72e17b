"""Distil CLEAR weights for a FLUX model from the command line (the same loop as the CLEAR
Distill node) for long runs.

It needs ComfyUI: the model and its text encoders are loaded, and the prompts encoded, by
ComfyUI's own loaders, so any FLUX.1-layout model ComfyUI reads works (dev, schnell,
fine-tunes, merges; fp8 files too). Run it with ComfyUI's Python from the ComfyUI folder:

    python custom_nodes/ComfyUI-UltraRes/cli/clear_distill.py --comfyui . \\
        --unet models/diffusion_models/flux1-dev.safetensors \\
        --clip models/text_encoders/clip_l.safetensors --clip models/text_encoders/t5xxl_fp16.safetensors \\
        --prompts prompts.txt --out models/clear/clear_local_16_mymodel.safetensors \\
        --radius 16 --steps 10000 --samples 10000

(or ``python -m ultrares.cli.clear_distill ...`` where the pack is installed). ``--checkpoint``
takes a single file with the text encoders instead of ``--unet``/``--clip``. ``--comfyui`` (or
``COMFYUI_PATH``) names the ComfyUI folder. Ctrl-C stops the run and saves what was trained;
``--resume`` continues a file.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run by path: run as ultrares.cli.clear_distill
    import _pack

    _pack.run(__file__)

import argparse
import os
import sys
from pathlib import Path

from ..models.clear import ClearDistillSettings, ClearPattern
from ._distill_tool import boot_comfyui, run_reported

WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e5m2")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cli/clear_distill.py", description=__doc__.split("\n\n")[0],
                                epilog="See the module docstring for an example.")
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", "."),
                   help="ComfyUI folder (default: $COMFYUI_PATH or the current folder)")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--unet", help="FLUX diffusion model file (as the Load Diffusion Model node reads)")
    model.add_argument("--checkpoint", help="FLUX checkpoint with its text encoders in one file")
    p.add_argument("--clip", action="append", default=[], help="a text encoder file for --unet (repeat: clip_l, t5xxl)")
    p.add_argument("--weight-dtype", choices=WEIGHT_DTYPES, default="default",
                   help="storage of the frozen weights, as the Load Diffusion Model node (fp8 halves their memory)")
    p.add_argument("--prompt", action="append", default=[], help="a training prompt (repeatable)")
    p.add_argument("--prompts", type=Path, help="a text file with one training prompt per line")
    p.add_argument("--negative", default="", help="negative prompt of the teacher trajectories (used when --cfg > 1)")
    p.add_argument("--guidance", type=float, default=3.5,
                   help="FLUX guidance in the conditioning, as the FluxGuidance node (the paper trains with 3.5)")
    p.add_argument("--out", type=Path, required=True, help="CLEAR weights file to write (.safetensors)")
    p.add_argument("--resume", action="store_true", help="continue training --out")
    p.add_argument("--radius", type=int, default=16, help="window radius in tokens (released: 8, 16, 32)")
    p.add_argument("--down-factor", type=int, default=1, help="cell size of the down-sampled keys (released: 4); 1 = none")
    p.add_argument("--steps", type=int, default=1000, help="optimiser steps in this run (the paper: 10K)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--resolution", type=int, default=1024, help="side of the square training images")
    p.add_argument("--batch-size", type=int, default=1, help="teacher samples per optimiser step")
    p.add_argument("--samples", type=int, default=1000, help="teacher samples in the pool (the paper: 10K)")
    p.add_argument("--sampling-steps", type=int, default=20, help="steps of each teacher trajectory")
    p.add_argument("--cfg", type=float, default=1.0, help="CFG of the teacher trajectories")
    p.add_argument("--flow-matching-weight", type=float, default=1.0)
    p.add_argument("--prediction-weight", type=float, default=0.5)
    p.add_argument("--attention-weight", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--optimizer-on-cpu", action="store_true",
                   help="keep AdamW's float32 values and state in RAM (27 GiB for FLUX.1), only bf16 copies on the GPU")
    p.add_argument("--cpu", action="store_true", help="run ComfyUI on the CPU")
    args = p.parse_args(argv)
    if args.prompts:
        args.prompt += [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
    if not args.prompt:
        p.error("give at least one --prompt or a --prompts file")
    if args.unet and not args.clip:
        p.error("--unet needs its text encoders: give --clip (clip_l and t5xxl)")
    return args


def _load(args: argparse.Namespace):
    """The diffusion model and text encoders, through ComfyUI's own loaders."""
    import comfy.sd
    import torch

    if args.checkpoint:
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=False, output_clip=True)
        if clip is None:
            raise SystemExit(f"{args.checkpoint} has no text encoders: give --unet and --clip instead")
        return model, clip
    options = {} if args.weight_dtype == "default" else {"dtype": getattr(torch, args.weight_dtype.replace("fp8", "float8"))}
    model = comfy.sd.load_diffusion_model(args.unet, model_options=options)
    clip = comfy.sd.load_clip(ckpt_paths=args.clip, clip_type=comfy.sd.CLIPType.FLUX)
    return model, clip


def _encode(clip, text: str, guidance: float) -> list:
    """One CONDITIONING entry per prompt, with FLUX's guidance value as FluxGuidance sets it."""
    return [[cond, {**extras, "guidance": guidance}] for cond, extras in
            clip.encode_from_tokens_scheduled(clip.tokenize(text))]


def run(args: argparse.Namespace) -> int:
    """Load the teacher with ComfyUI and distil; returns the process exit status."""
    from ..nodes.clear.distillation import distill_report, run_clear_distillation
    from ..nodes.clear.nodes import SCHEDULER
    from ..nodes.training import TrajectorySettings

    model, clip = _load(args)
    positive = [entry for text in args.prompt for entry in _encode(clip, text, args.guidance)]
    settings = ClearDistillSettings(steps=args.steps, learning_rate=args.lr, batch_size=args.batch_size,
                                    samples=args.samples, flow_matching_weight=args.flow_matching_weight,
                                    prediction_weight=args.prediction_weight, attention_weight=args.attention_weight,
                                    seed=args.seed, save_every=args.save_every,
                                    optimizer_on_cpu=args.optimizer_on_cpu)
    trajectory = TrajectorySettings(width=args.resolution, height=args.resolution, sampling_steps=args.sampling_steps,
                                    cfg=args.cfg, scheduler=SCHEDULER)

    report = distill_report(args.out, args.steps, lambda text: print(text, flush=True))
    return run_reported(lambda: run_clear_distillation(
        model, positive, _encode(clip, args.negative, args.guidance), args.out,
        ClearPattern(args.radius, args.down_factor), settings, trajectory, args.resume, report=report), report)


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, boot ComfyUI and distil; returns the exit status."""
    args = parse_args(argv)
    boot_comfyui(args.comfyui, args.cpu)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
