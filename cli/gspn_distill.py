"""Command line for long GSPN distillation runs (the same loop as the GSPN Distill node).

It needs ComfyUI: the checkpoint is loaded and the prompts are encoded by ComfyUI's own
loaders, so any SD1.5/SDXL checkpoint ComfyUI reads works. Run it with ComfyUI's Python:

    python custom_nodes/ComfyUI-UltraRes/cli/gspn_distill.py --comfyui . \\
        --checkpoint models/checkpoints/sd15.safetensors --prompts prompts.txt \\
        --out models/gspn/gspn_sd15.safetensors --steps 20000

(or ``python -m ultrares.cli.gspn_distill ...`` where the pack is installed). ``--comfyui`` (or
``COMFYUI_PATH``) names the ComfyUI folder. Ctrl-C stops the run and saves what was trained;
``--resume`` continues a file.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run by path: run as ultrares.cli.gspn_distill
    import _pack

    _pack.run(__file__)

import argparse
import os
import sys
from pathlib import Path

from ..models.gspn import DistillSettings, GSPNConfig
from ._distill_tool import boot_comfyui, run_reported


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cli/gspn_distill.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", "."), help="ComfyUI folder (default: "
                   "$COMFYUI_PATH or the current folder)")
    p.add_argument("--checkpoint", required=True, help="SD1.5/SDXL checkpoint with its text encoder")
    p.add_argument("--prompt", action="append", default=[], help="a training prompt (repeatable)")
    p.add_argument("--prompts", type=Path, help="a text file with one training prompt per line")
    p.add_argument("--negative", default="", help="negative prompt of the teacher trajectories")
    p.add_argument("--out", type=Path, required=True, help="weights file to write (.safetensors)")
    p.add_argument("--resume", action="store_true", help="continue training --out")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--sampling-steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--prediction-weight", type=float, default=0.0)
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--proxy-ratio", type=int, default=0, help="proxy width divisor (default 0: 8 for SD1.5, "
                   "32 for SDXL, as in the paper)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--cpu", action="store_true", help="run ComfyUI on the CPU")
    args = p.parse_args(argv)
    if args.prompts:
        args.prompt += [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
    if not args.prompt:
        p.error("give at least one --prompt or a --prompts file")
    return args


def _encode(clip, text: str) -> list:
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def run(args: argparse.Namespace) -> int:
    """Load the teacher with ComfyUI and distil; returns the process exit status."""
    import comfy.sd

    from ..nodes.gspn.distillation import TrajectorySettings, distill_report, run_distillation

    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=False, output_clip=True)
    if clip is None:
        raise SystemExit(f"{args.checkpoint} has no text encoder: the prompts cannot be encoded")
    positive = [entry for text in args.prompt for entry in _encode(clip, text)]
    settings = DistillSettings(steps=args.steps, learning_rate=args.lr, prediction_weight=args.prediction_weight,
                               seed=args.seed, save_every=args.save_every)
    trajectory = TrajectorySettings(width=args.width, height=args.height, batch_size=args.batch_size,
                                    sampling_steps=args.sampling_steps, cfg=args.cfg)

    report = distill_report(args.out, args.steps, lambda text: print(text, flush=True))
    return run_reported(lambda: run_distillation(
        model, positive, _encode(clip, args.negative), args.out, settings, trajectory,
        GSPNConfig(chunk=args.chunk, proxy_ratio=args.proxy_ratio), args.resume, report=report), report)


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, boot ComfyUI and distil; returns the exit status."""
    args = parse_args(argv)
    boot_comfyui(args.comfyui, args.cpu)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
