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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .gpu_report import Section, guarded, markdown, table_bandwidth, write
from .machine import describe_machine
from .timing import threads

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


# --- timing -------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn: Callable[[], object], device: torch.device, repeats: int, calls: int = 1) -> float:
    """Fastest of ``repeats`` timings of ``calls`` back-to-back calls (per call), after one warm-up."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value * 1e3:.3f}" if value < 1 else f"{value * 1e3:.0f}"


def _error(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """Max |got - want| and that over max |want|."""
    diff = (got.double() - want.double()).abs().max().item()
    return diff, diff / max(want.double().abs().max().item(), 1e-30)


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _heads(n: int) -> str:
    return f"{n} head{'s' if n != 1 else ''}"


# --- (a) exactness ------------------------------------------------------------------------------

def _clear_inputs(side: int, sizes: Sizes, heads: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (1, heads, sizes.text + side * side, sizes.head_dim)
    return tuple(torch.randn(shape, generator=g).to(device, dtype) for _ in range(3))


def exactness(section: Section, sizes: Sizes, device: torch.device) -> None:
    from ..kernels.backend import resolve_backend
    from ..kernels.clear_attention import CLEAR_BACKENDS
    from ..kernels.gspn_scan import GSPN_BACKENDS, gspn_scan
    from ..models.clear.attention import ClearAttention, TokenLayout
    from .clear_attention import RELEASED

    rows = section.table(["kernel", "case", "dtype", "backend", "reference", "max abs err", "max err / max ref",
                          "within tolerance"])

    def add(kernel, case, dtype, backend, reference, got, want):
        absolute, relative = _error(got, want)
        ok = "yes" if relative <= TOLERANCE[dtype] else "NO"
        rows.append([kernel, case, _dtype(dtype), backend, reference, f"{absolute:.3g}", f"{relative:.3g}", ok])

    last = None
    for label, side in sizes.grids.items():
        for window in sizes.check_windows:
            for dtype in sizes.check_dtypes:
                what = f"CLEAR {label} {window} {_dtype(dtype)}"
                if last is not None and not section.fits(last * (side / last_side) ** 2, what):
                    continue
                start = time.perf_counter()
                q, k, v = _clear_inputs(side, sizes, sizes.heads_check, dtype, device)
                layout = TokenLayout((side, side))
                got = guarded(section, what, lambda: ClearAttention(RELEASED[window], backend="triton")(q, k, v, layout))
                if got is not None:
                    want = ClearAttention(RELEASED[window], backend="torch")(q, k, v, layout)
                    add("CLEAR", f"{label} ({side}x{side} + {sizes.text} text), {window}, {_heads(sizes.heads_check)}",
                        dtype, "triton", "pack's torch path, same dtype", got, want)
                _sync(device)
                last, last_side = time.perf_counter() - start, side
                del q, k, v
    # fp32: whatever auto picks, against the torch path in fp64 (smallest grid).
    label, side = next(iter(sizes.grids.items()))
    window = sizes.check_windows[0]
    if section.fits(3 * (last or 0.0), f"CLEAR {label} fp32 auto"):
        q, k, v = _clear_inputs(side, sizes, sizes.heads_check, torch.float32, device)
        layout = TokenLayout((side, side))
        route = resolve_backend("auto", q, k, v, op=CLEAR_BACKENDS)
        got = guarded(section, "CLEAR fp32 auto", lambda: ClearAttention(RELEASED[window], backend="auto")(q, k, v, layout))
        if got is not None:
            want = ClearAttention(RELEASED[window], backend="torch")(q.double(), k.double(), v.double(), layout)
            add("CLEAR", f"{label}, {window}, {_heads(sizes.heads_check)}", torch.float32, f"auto -> {route}",
                "torch path in fp64", got, want)

    for side, channels in sizes.gspn_maps[:sizes.gspn_check_maps]:
        for chunk in (4, None):
            variant = "chunk 4" if chunk else "global"
            for dtype in (*sizes.check_dtypes, torch.float32):
                what = f"GSPN {side}x{side}x{channels} {variant} {_dtype(dtype)}"
                if not section.fits(1.0, what):
                    continue
                g = torch.Generator().manual_seed(side)
                x, lam = (torch.randn(1, side, side, channels, generator=g).to(device, dtype) for _ in range(2))
                logits = (2 * torch.randn(1, side, side, 3, channels, generator=g)).to(device, dtype)
                backend = "auto" if dtype == torch.float32 else "triton"
                route = resolve_backend(backend, x, lam, logits, op=GSPN_BACKENDS)
                case = f"{side}x{side}, {channels} ch, {variant}, 4 directions"
                for grad in (False, True):
                    inputs = [t.detach().requires_grad_(grad) for t in (x, lam, logits)]
                    ref_inputs = [t.detach().double().requires_grad_(grad) if dtype == torch.float32
                                  else t.detach().requires_grad_(grad) for t in (x, lam, logits)]

                    def run(ts, b):
                        with torch.set_grad_enabled(grad):
                            return torch.stack([gspn_scan(*ts, d, chunk, backend=b) for d in range(4)])

                    got = guarded(section, what, lambda: run(inputs, backend))
                    if got is None:
                        break
                    want = run(ref_inputs, "torch")
                    reference = "reference in fp64" if dtype == torch.float32 else "reference, same dtype"
                    if not grad:
                        add("GSPN forward", case, dtype, backend if backend != "auto" else f"auto -> {route}",
                            reference, got, want)
                        continue
                    cotangent = torch.randn(got.shape, generator=g).to(device)
                    grads = torch.autograd.grad(got, inputs, cotangent.to(got.dtype))
                    ref_grads = torch.autograd.grad(want, ref_inputs, cotangent.to(want.dtype))
                    for name, a, b in zip(("dx", "dlam", "dlogits"), grads, ref_grads):
                        add(f"GSPN backward ({name})", case, dtype, backend if backend != "auto" else f"auto -> {route}",
                            reference, a, b)
    section.notes.append("Tolerance on max error / max |reference|: " + ", ".join(
        f"{_dtype(d)} {t:g}" for d, t in TOLERANCE.items()) + ". 16-bit GSPN runs store one rounding of an "
        "fp32 scan; the reference rounds the same fp32 scan once.")


# --- (b) attention time -------------------------------------------------------------------------

def _comfy_kitchen():
    """comfy-kitchen's module when it imports (it is optional), else None."""
    try:
        import comfy_kitchen
    except Exception:
        return None
    return comfy_kitchen


def _dense_runner(q, k, v):
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return lambda: F.scaled_dot_product_attention(q, k, v)
    if q.is_cuda:
        def run():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v)
        return run
    return lambda: F.scaled_dot_product_attention(q, k, v)


def _na2d_runner(kitchen, q, k, v, side: int, text: int, kernel: int):
    """comfy-kitchen's ``na2d`` over the image tokens: ``(B, H, W, heads, D)`` tensors."""
    def grid(t):
        return t[:, :, text:].unflatten(2, (side, side)).permute(0, 2, 3, 1, 4).contiguous()

    qi, ki, vi = grid(q), grid(k), grid(v)
    return lambda: kitchen.na2d(qi, ki, vi, kernel)


def _sol_runner(kitchen, q, k, v):
    """comfy-kitchen's ``sol_attn`` over the whole sequence: ``(B, T, heads, D)`` tensors."""
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    return lambda: kitchen.sol_attn(qt, kt, vt, 1.0)


def attention_times(section: Section, sizes: Sizes, device: torch.device, dtype: torch.dtype) -> None:
    from ..kernels._clear_tiles import raster_work, tiled_work
    from ..kernels._clear_triton import DEFAULT_K_TILE, DEFAULT_Q_TILE, SIDE_BLOCK
    from ..kernels.backend import resolve_backend
    from ..kernels.clear_attention import CLEAR_BACKENDS
    from ..models.clear.attention import ClearAttention, TokenLayout
    from ..models.clear.downsample import down_sampled_count
    from .clear_attention import RASTER_BLOCK, RELEASED, flex_runner

    kitchen = _comfy_kitchen()
    na2d = kitchen is not None and hasattr(kitchen, "na2d")
    sol = kitchen is not None and hasattr(kitchen, "sol_attn") and (
        not hasattr(kitchen, "sol_attn_is_available") or device.type != "cuda" or kitchen.sol_attn_is_available(device))
    if kitchen is None:
        section.notes.append("comfy-kitchen is not installed here: its na2d and sol_attn are not timed.")
    else:
        section.notes.append(f"comfy-kitchen {getattr(kitchen, '__version__', '(version unknown)')}: na2d "
                             f"{'timed' if na2d else 'not available'}, sol_attn {'timed' if sol else 'not available'}.")
    flash = device.type == "cuda"
    heads, dim = sizes.heads_time, sizes.head_dim
    rows = section.table(["image", "tokens", "method", "window", "ms per call", "work TFLOP", "TFLOP/s on that work",
                          "exact-work TFLOP/s", "work counted"])
    estimates: dict[str, tuple[float, float]] = {}  # method -> (seconds, dense pairs) at the last size

    def timed(method: str, window: str, label: str, dense_pairs: int, make: Callable[[], Callable[[], object]]):
        """Best time of one method, or None when its estimate does not fit (or it fails). The estimate
        scales the last size's time with the dense pairs (exact for dense, an upper bound for the
        windowed methods) plus the last compile time; FlexAttention's first compile is taken as 45 s."""
        key = f"{method} {window}"
        if key in estimates:
            seconds, pairs = estimates[key]
            estimate = (1 + sizes.repeats) * seconds * dense_pairs / pairs + estimates["compile " + key][0]
        else:
            estimate = 45.0 if method == "FlexAttention" and device.type == "cuda" else 5.0
        if not section.fits(estimate, f"{method} {window} at {label}"):
            return None
        start = time.perf_counter()
        run = guarded(section, f"{method} {window} at {label}", make)
        if run is None:
            return None
        first = time.perf_counter()
        result = guarded(section, f"{method} {window} at {label}", lambda: run())
        _sync(device)
        if result is None:
            return None
        compile_seconds = time.perf_counter() - first
        seconds = best_seconds(run, device, sizes.repeats)
        estimates[key] = (seconds, dense_pairs)
        estimates["compile " + key] = (max(compile_seconds - seconds, 0.0) + (first - start), 0)
        return seconds

    for label, side in sizes.grids.items():
        grid = (side, side)
        n_img = side * side
        q, k, v = _clear_inputs(side, sizes, heads, dtype, device, seed=1)
        dense_pairs = (sizes.text + n_img) ** 2
        tokens = f"{sizes.text + n_img}"

        def add(method, window, seconds, work_pairs, exact_pairs, counted):
            work = 4.0 * dim * heads * work_pairs if work_pairs else None
            exact = 4.0 * dim * heads * exact_pairs if exact_pairs else None
            rows.append([label, tokens, method, window, _seconds(seconds),
                         f"{work / 1e12:.3f}" if work else "—",
                         f"{work / seconds / 1e12:.1f}" if work and seconds else "—",
                         f"{exact / seconds / 1e12:.1f}" if exact and seconds else "—", counted])

        seconds = timed("dense SDPA", "—", label, dense_pairs, lambda: _dense_runner(q, k, v))
        add("dense SDPA" + (" (flash)" if flash else ""), "—", seconds, dense_pairs, dense_pairs, "all pairs")
        if sol:
            seconds = timed("sol_attn", "—", label, dense_pairs, lambda: _sol_runner(kitchen, q, k, v))
            add("comfy-kitchen sol_attn (tau 1)", "—", seconds, None, None, "routed blocks: not counted")
        for window in sizes.time_windows:
            pattern = RELEASED[window]
            n_down = down_sampled_count(grid, pattern.down_factor) if pattern.down_factor > 1 else 0
            tiles = tiled_work(grid, pattern.radius, sizes.text, 0, n_down, DEFAULT_Q_TILE, DEFAULT_K_TILE, SIDE_BLOCK,
                               block=RASTER_BLOCK)
            clear = ClearAttention(pattern, backend="auto")
            route = resolve_backend("auto", q, k, v, op=CLEAR_BACKENDS)
            seconds = timed("pack", window, label, dense_pairs,
                            lambda: (lambda: clear(q, k, v, TokenLayout(grid))))
            add(f"pack (auto -> {route})", window, seconds, tiles.computed_pairs, tiles.allowed_pairs,
                "visited 2D tiles")
            raster = raster_work(grid, pattern.radius, sizes.text, 0, n_down, block=RASTER_BLOCK)
            seconds = timed("FlexAttention", window, label, dense_pairs,
                            lambda: flex_runner(grid, pattern, q, k, v, compiled=device.type == "cuda"))
            add("FlexAttention" + ("" if device.type == "cuda" else " (eager)"), window, seconds,
                raster.computed_pairs, raster.allowed_pairs, "visited 128x128 blocks")
            if na2d and pattern.down_factor == 1:
                kernel = 2 * pattern.radius - 1
                seconds = timed("na2d", window, label, dense_pairs,
                                lambda: _na2d_runner(kitchen, q, k, v, side, sizes.text, kernel))
                add(f"comfy-kitchen na2d ({kernel}x{kernel}, image only)", window, seconds,
                    n_img * min(kernel, side) ** 2, None, "window pairs")
        del q, k, v
        if device.type == "cuda":
            torch.cuda.empty_cache()
    section.notes.append(
        "Work per call: 4 x head dim x heads x (query, key) pairs. 'work' = the pairs each method computes "
        "(pack: visited 8x16-query / 8x8-key tiles plus dense text rows; FlexAttention: visited 128x128 "
        "blocks; na2d: its square windows over the image tokens only, no text); 'exact work' = the pairs "
        "CLEAR's pattern allows. na2d and sol_attn compute other attention patterns (no circle, no text "
        "rows / approximate routing): their times are context, not like-for-like.")


# --- (c) GSPN bandwidth -------------------------------------------------------------------------

def copy_bandwidth(device: torch.device, size: int) -> float:
    """GB/s of a device-to-device copy (bytes read + written per second)."""
    src = torch.empty(size // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = best_seconds(lambda: dst.copy_(src), device, 5)
    return 2 * src.numel() * 4 / seconds / 1e9


def gspn_bandwidth(section: Section, sizes: Sizes, device: torch.device, peak: float | None,
                   copy: float | None) -> None:
    from ..kernels._gspn_plan import plan_scan, traffic
    from ..kernels._gspn_triton import sm_count
    from ..kernels.gspn_scan import gspn_scan

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    rows = section.table(["map", "channels", "chunk", "pass", "path, channels/program, programs", "us per call",
                          "MB moved", "GB/s", "% of data-sheet peak", "% of copy"])
    sms = sm_count(device)
    for side, channels in sizes.gspn_maps:
        for chunk in (4, None):
            steps = chunk or side
            shape = (1, side, side, channels)
            plan = plan_scan(shape, 0, steps, sms)
            g = torch.Generator().manual_seed(0)
            x, lam = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(2))
            logits = torch.randn(1, side, side, 3, channels, generator=g).to(device, dtype)
            for pass_ in ("forward", "training"):
                what = f"GSPN {side}x{side}x{channels} chunk {chunk} {pass_}"
                if not section.fits(2.0, what):
                    continue
                if pass_ == "forward":
                    moved = traffic(shape, 0, steps, dtype, "forward", False, sms).total

                    def run():
                        with torch.no_grad():
                            return gspn_scan(x, lam, logits, 0, chunk, backend="triton")
                else:
                    moved = (traffic(shape, 0, steps, dtype, "forward", True, sms).total
                             + traffic(shape, 0, steps, dtype, "backward", True, sms).total)
                    inputs = [t.detach().requires_grad_() for t in (x, lam, logits)]
                    cotangent = torch.randn_like(x)

                    def run():
                        return torch.autograd.grad(gspn_scan(*inputs, 0, chunk, backend="triton"), inputs, cotangent)
                seconds = guarded(section, what, lambda: best_seconds(run, device, sizes.repeats,
                                                                    calls=10 if device.type == "cuda" else 1))
                if seconds is None:
                    continue
                gbs = moved / seconds / 1e9
                rows.append([f"{side}x{side}", str(channels), "4" if chunk else f"global ({side})",
                             "forward (inference)" if pass_ == "forward" else "forward + backward",
                             f"{'resident' if plan.resident else 'streamed'}, {plan.block_c}, {plan.programs}",
                             f"{seconds * 1e6:.1f}", f"{moved / 1e6:.2f}", f"{gbs:.0f}",
                             f"{100 * gbs / peak:.1f}" if peak else "—", f"{100 * gbs / copy:.1f}" if copy else "—"])
    section.notes.append(
        f"{_dtype(dtype)}, batch 1, one direction per call. Bytes moved = every element the kernels load and "
        "store (kernels/_gspn_plan.py, tested equal to what the interpreted kernels touch); caches ignored. "
        f"Programs for {sms} SMs.")


# --- (d) Inf-DiT --------------------------------------------------------------------------------

def infdit(section: Section, sizes: Sizes, device: torch.device) -> None:
    from ..models.infdit import (RELEASED, BudgetTooSmall, ClipVisionConfig, UpscaleOptions, allocator_headroom,
                                 estimate_memory, plan_stage, tiny_weights, weight_bytes)
    from ..models.infdit.budget import fit_budget
    from ..models.infdit.sampler import evaluations
    from .infdit_memory import measure

    if sizes is FULL:
        weights = tiny_weights(cfg=RELEASED, clip_cfg=ClipVisionConfig(), dtype=torch.bfloat16)
        label = "released configuration (hidden 1280, 28 layers, 16 heads, 128-px blocks) + ViT-L/14, random bf16"
    else:
        weights = tiny_weights()
        label = "tiny model (dry run), fp32"
    weights.net.to(device)
    weights.clip.to(device)
    cfg = weights.net.cfg
    lr = sizes.infdit_lr_side
    out = 4 * lr
    budgets = sizes.infdit_budgets
    if budgets is None:
        kwargs = dict(weight_bytes=weight_bytes(weights), dtype=weights.net.dtype, offload=False)
        floor = estimate_memory(cfg, out, out, 1, **kwargs).total
        budgets = (0.5 * floor, 1.05 * floor, estimate_memory(cfg, out, out, out // cfg.block_px, **kwargs).total)
    default_steps = UpscaleOptions().steps
    growth = (4096 // out) ** 2  # blocks of a 4096x4096 output per block of this one
    section.intro = (f"{label}; one 4x stage {lr}x{lr} -> {out}x{out}, one Heun step (one network evaluation "
                     f"per block batch). Extrapolated to 4096x4096: {growth}x the blocks, so {growth}x the time per "
                     f"evaluation (each block attends to itself and a fixed set of neighbours); a full sample takes "
                     f"{evaluations(default_steps)} evaluations ({default_steps} steps).")
    rows = section.table(["budget", "n", "offload", "memory model", "peak", "peak <= budget", "s per evaluation",
                          "4096² s per evaluation (extrap.)", f"4096² full sample s (extrap., {default_steps} steps)"])
    if device.type == "cuda" and section.fits(20.0, "Inf-DiT warm-up"):
        guarded(section, "Inf-DiT warm-up", lambda: measure(weights, cfg.block_px // 4, UpscaleOptions(scale=4, steps=1),
                                                            device))
    last = None
    for budget in budgets:
        what = f"Inf-DiT budget {budget / GiB:.2f} GiB"
        if not section.fits(1.5 * last if last else 10.0, what):
            continue
        try:
            # With the headroom the node plans with on this device (CUDA's allocator fragments).
            options = fit_budget(weights, (lr, lr), UpscaleOptions(scale=4, steps=1, budget_bytes=budget,
                                                                   margin=allocator_headroom(device)))
        except BudgetTooSmall as error:
            rows.append([_budget(budget), "refused", "", "", "", "", "", "", f"{error}".split("\n")[0][:80]])
            continue
        plan = plan_stage(weights, out, out, options)
        start = time.perf_counter()
        peak = guarded(section, what, lambda: measure(weights, lr, options, device))
        seconds = time.perf_counter() - start
        if peak is None:
            continue
        last = seconds
        per_eval = seconds / evaluations(options.steps)
        rows.append([_budget(budget), str(plan.n), "yes" if options.offload else "no", _budget(plan.total),
                     _budget(peak), "yes" if peak <= budget else "NO", f"{per_eval:.2f}", f"{growth * per_eval:.1f}",
                     f"{growth * per_eval * evaluations(default_steps):.0f}"])
    section.notes.append("Peak = torch.cuda.max_memory_allocated around the upscale (weights included); on the CPU "
                         "(dry run) the live-tensor meter of benchmarks/infdit_memory.py. The timed run includes "
                         "CLIP, preparation and the block scheduling, so 's per evaluation' is an upper bound.")


def _budget(value: float) -> str:
    return f"{value / GiB:.2f} GiB" if value >= GiB else f"{value / 2**20:.2f} MiB"


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
    b.intro = (f"{_heads(sizes.heads_time)} x {sizes.head_dim}, {sizes.text} text tokens, batch 1, "
               f"{_dtype(attention_dtype)}; best of {sizes.repeats} after a warm-up (which compiles).")
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
