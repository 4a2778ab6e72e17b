"""One prepared GPU run: every Triton kernel against its PyTorch reference at real sizes, attention
time per call against dense SDPA, FlexAttention and comfy-kitchen, the GSPN op's bandwidth, and
the released-size Inf-DiT under VRAM budgets, written as one markdown report.

``python -m ultrares.benchmarks gpu [--out REPORT.md] [--dry]``

Sections (each with its own time cap, so the whole run stays under about 8 minutes on one GPU;
a measurement whose estimate does not fit is skipped and the report says so):

(a) exactness: CLEAR's Triton kernel vs the pack's exact PyTorch path on FLUX 2K/4K/8K token
    grids in bf16 and fp16; the GSPN kernels (forward and backward) vs the PyTorch reference on
    SDXL-sized maps; fp32 through the backend ``auto`` picks, against fp64;
(b) time per FLUX attention call at 2K/4K/8K (24 heads x 128, 512 text tokens): the pack's CLEAR
    path (``auto``), dense SDPA (flash), FlexAttention with CLEAR's block mask, and comfy-kitchen's
    ``na2d`` (a square window over the image tokens) and ``sol_attn`` when importable, with
    TFLOP/s on the work each one visits (``kernels/_clear_tiles.py``'s counts);
(c) the GSPN op's bandwidth: bytes the kernels move (``kernels/_gspn_plan.py``'s exact count) per
    second, as a fraction of the GPU's data-sheet peak and of a device-to-device copy timed in
    the same run;
(d) the released Inf-DiT (hidden 1280, 28 layers, 16 heads, 128-px blocks) with random bf16
    weights: one 4x stage to 2048x2048 under budgets of 4, 8 and 16 GiB: peak memory
    (``torch.cuda.max_memory_allocated``) against the budget, seconds per network evaluation,
    and the time extrapolated to a 4096x4096 output.

``--dry`` runs every section at tiny sizes on the CPU (Triton kernels in its interpreter) to check
the plumbing and the report; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

from .gpu_report import Section, guarded, markdown, table_bandwidth, write
from .gpu_sections import attention_times, copy_bandwidth, exactness, gspn_bandwidth, infdit
from .gpu_sizes import DRY, FULL, GiB, Sizes, dtype_name, heads_text
from .machine import describe_machine
from .timing import threads


# --- the run ------------------------------------------------------------------------------------

def _versions() -> list[str]:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "not installed"
    lines = [f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"machine: {describe_machine()}",
             f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton_version}, "
             f"Python {platform.python_version()}"]
    return lines


def run(sizes: Sizes, device: torch.device, out: Path, dry: bool) -> Path:
    started = time.perf_counter()
    header = _versions()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        header.append(f"GPU: {props.name}, compute capability {props.major}.{props.minor}, "
                      f"{props.multi_processor_count} SMs, {props.total_memory / GiB:.0f} GiB")
        name = props.name
    else:
        header.append("DRY RUN on the CPU (Triton kernels in its interpreter): the numbers below only show the "
                      "report's format and mean nothing about any GPU")
        name = ""
    sections = []

    def section(key: str, title: str) -> Section:
        s = Section(title, sizes.caps[key])
        sections.append(s)
        return s

    a = section("a", "(a) Triton kernels against their PyTorch references")
    guarded(a, "section (a)", lambda: exactness(a, sizes, device))
    a.close()
    b = section("b", "(b) Time per FLUX attention call")
    attention_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    b.intro = (f"{heads_text(sizes.heads_time)} x {sizes.head_dim}, {sizes.text} text tokens, batch 1, "
               f"{dtype_name(attention_dtype)}; best of {sizes.repeats} after a warm-up (which compiles).")
    guarded(b, "section (b)", lambda: attention_times(b, sizes, device, attention_dtype))
    b.close()
    c = section("c", "(c) GSPN op bandwidth")
    peak = table_bandwidth(name) if name else None
    copy = guarded(c, "device copy", lambda: copy_bandwidth(device, GiB if device.type == "cuda" else 2**24))
    c.intro = (f"Device bandwidth: data-sheet peak {f'{peak:.0f} GB/s' if peak else 'unknown for this GPU'} "
               f"(table in benchmarks/gpu_report.py, by GPU name); device-to-device copy measured in this run "
               f"{f'{copy:.0f} GB/s' if copy else 'not measured'} (read + write bytes).")
    guarded(c, "section (c)", lambda: gspn_bandwidth(c, sizes, device, peak, copy))
    c.close()
    d = section("d", "(d) Inf-DiT, released size, under VRAM budgets")
    guarded(d, "section (d)", lambda: infdit(d, sizes, device))
    d.close()
    title = "UltraRes GPU report" + (" (dry run: format only)" if dry else "")
    return write(out, markdown(title, header, sections, time.perf_counter() - started))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ultrares.benchmarks gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="report file (default: gpu-report-<date>.md, or "
                                                 "gpu-report-dry.md with --dry)")
    parser.add_argument("--dry", action="store_true",
                        help="tiny sizes on the CPU, Triton in its interpreter: checks the plumbing and the report")
    parser.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # the runner's flag: same as --dry
    args = parser.parse_args(argv)
    dry = args.dry or args.quick
    if dry:
        if "triton" not in sys.modules:
            os.environ.setdefault("TRITON_INTERPRET", "1")
        device, sizes = torch.device("cpu"), DRY
    elif torch.cuda.is_available():
        device, sizes = torch.device("cuda"), FULL
    else:
        parser.error("no CUDA GPU here: run it on one, or use --dry to check the plumbing on the CPU")
    out = args.out or Path(f"gpu-report-{'dry' if dry else datetime.date.today().isoformat()}.md")
    cpu_threads = contextlib.nullcontext() if device.type == "cuda" else threads(1)
    with cpu_threads, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")  # dry: eager
        path = run(sizes, device, out, dry)
    print(f"report written to {path}")


if __name__ == "__main__":
    main()
