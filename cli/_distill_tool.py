"""What the two distillation tools (``clear_distill.py``, ``gspn_distill.py``) share: ComfyUI put
on the import path before its model management loads, and a run that says, on Ctrl-C, how it
left the file (the run itself saves what was trained before the interrupt goes on)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..nodes.distill_report import DistillReport

INTERRUPTED = 130
"""The exit status of a run stopped with Ctrl-C (128 + SIGINT), as shells report it."""


def boot_comfyui(path: str, cpu: bool) -> None:
    """Put ComfyUI on the import path and set its device flag before its model management loads."""
    root = Path(path).resolve()
    if not (root / "comfy").is_dir():
        raise SystemExit(f"{root} is not a ComfyUI folder (no comfy/); pass --comfyui or set COMFYUI_PATH")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu or comfy.cli_args.args.cpu


def run_reported(distil: Callable[[], object], report: DistillReport) -> int:
    """Run ``distil()``; the exit status (:data:`INTERRUPTED` after Ctrl-C, said through ``report``)."""
    try:
        distil()
    except KeyboardInterrupt:
        report.stopped("stopped (Ctrl-C)")
        print("continue with --resume", flush=True)
        return INTERRUPTED
    return 0
