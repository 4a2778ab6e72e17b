"""Convert the released Inf-DiT checkpoint to a safetensors file with this pack's key names.

    python custom_nodes/ComfyUI-UltraRes/cli/infdit_convert.py \\
        models/infdit/mp_rank_00_model_states.pt models/infdit/infdit.safetensors

(from the ComfyUI folder, with ComfyUI's Python; ``python -m ultrares.cli.infdit_convert ...``
where the pack is installed). It needs no ComfyUI.

The source is verified first (every DiT key present, every shape consistent); its RoPE tables
are kept as stored; the CLIP tower is taken from the checkpoint, or from
``--clip open_clip_pytorch_model.bin`` when given.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run by path: run as ultrares.cli.infdit_convert
    import _pack

    _pack.run(__file__)

import argparse
import sys

from ..models.infdit import DTYPES, InfDiTCheckpointError, convert_checkpoint


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and convert; returns the exit status (1 with the reason when refused)."""
    parser = argparse.ArgumentParser(prog="cli/infdit_convert.py", description=__doc__,
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
    except InfDiTCheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.target}: {cfg.layers} layers, width {cfg.hidden}, {cfg.heads} heads, "
          f"{cfg.block_px}-px blocks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
