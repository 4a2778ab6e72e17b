"""Convert the released Inf-DiT checkpoint to a safetensors file with this pack's key names.

    python -m models.infdit.convert mp_rank_00_model_states.pt ../../models/infdit/infdit.safetensors

(from the pack's folder; ``python -m ultrares.models.infdit.convert`` where the pack is installed).

The source is verified first (every DiT key present, every shape consistent); its RoPE tables
are kept as stored; the CLIP tower is taken from the checkpoint, or from
``--clip open_clip_pytorch_model.bin`` when given.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .checkpoint import CheckpointError, convert_checkpoint

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__package__}.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="released mp_rank_00_model_states.pt (or any Inf-DiT file)")
    parser.add_argument("target", help="output .safetensors")
    parser.add_argument("--clip", help="separate OpenCLIP ViT-L/14 weights (open_clip naming)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="stored precision (default: bf16)")
    parser.add_argument("--allow-global", action="append", default=[], metavar="MODULE.NAME",
                        help="also build this pickled Python object when reading the source "
                             "(only for a file you trust; the error message names what is needed)")
    args = parser.parse_args(argv)
    try:
        cfg = convert_checkpoint(args.source, args.target, DTYPES[args.dtype], args.clip, tuple(args.allow_global))
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.target}: {cfg.layers} layers, width {cfg.hidden}, {cfg.heads} heads, "
          f"{cfg.block_px}-px blocks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
