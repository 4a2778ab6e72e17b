"""What the prepared GPU run measures at which sizes (:data:`FULL` on a GPU, :data:`DRY` for
``--dry``), how it times a call and how its report words the numbers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .timing import timed_call

GiB = 2**30


@dataclass(frozen=True)
class Sizes:
    """Everything the run's size depends on; :data:`FULL` on a GPU, :data:`DRY` for ``--dry``."""

    grids: dict[str, int]  # image label -> tokens per side
    text: int
    heads_check: int
    heads_time: int
    head_dim: int
    check_windows: tuple[str, ...]
    time_windows: tuple[str, ...]
    gspn_maps: tuple[tuple[int, int], ...]  # (side, channels), batch 1
    gspn_check_maps: int  # how many of gspn_maps (a) checks
    check_dtypes: tuple[torch.dtype, ...]  # 16-bit dtypes (a) checks the kernels in
    infdit_lr_side: int
    infdit_budgets: tuple[float, ...] | None  # bytes; None: derived from the tiny model's memory model
    caps: dict[str, float]  # section -> seconds
    repeats: int


FULL = Sizes(grids={"2K": 128, "4K": 256, "8K": 512}, text=512, heads_check=4, heads_time=24, head_dim=128,
             check_windows=("clear_local_16", "clear_local_8_down_4"),
             time_windows=("clear_local_32", "clear_local_16", "clear_local_8", "clear_local_16_down_4"),
             gspn_maps=((64, 640), (32, 1280), (128, 640), (64, 1280), (256, 640), (128, 1280)), gspn_check_maps=3,
             check_dtypes=(torch.bfloat16, torch.float16), infdit_lr_side=512, infdit_budgets=(4 * GiB, 8 * GiB, 16 * GiB),
             caps={"a": 90.0, "b": 180.0, "c": 40.0, "d": 110.0}, repeats=3)
DRY = Sizes(grids={"2K": 8, "4K": 10}, text=4, heads_check=1, heads_time=1, head_dim=16,
            check_windows=("clear_local_8",), time_windows=("clear_local_8", "clear_local_8_down_4"),
            gspn_maps=((4, 8), (3, 16)), gspn_check_maps=1,
            check_dtypes=(torch.bfloat16,), infdit_lr_side=16, infdit_budgets=None,
            caps={"a": 60.0, "b": 60.0, "c": 30.0, "d": 60.0}, repeats=1)
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-4}  # max |err| / max |ref|


# --- timing and wording -----------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn: Callable[[], object], device: torch.device, repeats: int, calls: int = 1) -> float:
    """Fastest of ``repeats`` timings of ``calls`` back-to-back calls (per call), after one warm-up."""
    fn()
    sync(device)

    def back_to_back() -> None:
        for _ in range(calls):
            fn()

    return min(timed_call(back_to_back, device) for _ in range(repeats)) / calls


def seconds_text(value: float | None) -> str:
    return "—" if value is None else f"{value * 1e3:.3f}" if value < 1 else f"{value * 1e3:.0f}"


def relative_error(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """Max |got - want| and that over max |want|."""
    diff = (got.double() - want.double()).abs().max().item()
    return diff, diff / max(want.double().abs().max().item(), 1e-30)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def heads_text(n: int) -> str:
    return f"{n} head{'s' if n != 1 else ''}"


def budget_text(value: float) -> str:
    return f"{value / GiB:.2f} GiB" if value >= GiB else f"{value / 2**20:.2f} MiB"
