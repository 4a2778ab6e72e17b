"""The four sections of the prepared GPU run (see :mod:`.gpu`): (a) the Triton kernels against
their PyTorch references, (b) time per FLUX attention call, (c) the GSPN op's bandwidth, (d) the
released-size Inf-DiT under VRAM budgets. Each fills its :class:`~.gpu_report.Section`."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .gpu_report import Section, guarded
from .gpu_sizes import (FULL, GiB, TOLERANCE, Sizes, best_seconds, budget_text, dtype_name, heads_text,
                        relative_error, seconds_text, sync)


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
        absolute, relative = relative_error(got, want)
        ok = "yes" if relative <= TOLERANCE[dtype] else "NO"
        rows.append([kernel, case, dtype_name(dtype), backend, reference, f"{absolute:.3g}", f"{relative:.3g}", ok])

    last = None
    for label, side in sizes.grids.items():
        for window in sizes.check_windows:
            for dtype in sizes.check_dtypes:
                what = f"CLEAR {label} {window} {dtype_name(dtype)}"
                if last is not None and not section.fits(last * (side / last_side) ** 2, what):
                    continue
                start = time.perf_counter()
                q, k, v = _clear_inputs(side, sizes, sizes.heads_check, dtype, device)
                layout = TokenLayout((side, side))
                got = guarded(section, what, lambda: ClearAttention(RELEASED[window], backend="triton")(q, k, v, layout))
                if got is not None:
                    want = ClearAttention(RELEASED[window], backend="torch")(q, k, v, layout)
                    add("CLEAR", f"{label} ({side}x{side} + {sizes.text} text), {window}, {heads_text(sizes.heads_check)}",
                        dtype, "triton", "pack's torch path, same dtype", got, want)
                sync(device)
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
            add("CLEAR", f"{label}, {window}, {heads_text(sizes.heads_check)}", torch.float32, f"auto -> {route}",
                "torch path in fp64", got, want)

    for side, channels in sizes.gspn_maps[:sizes.gspn_check_maps]:
        for chunk in (4, None):
            variant = "chunk 4" if chunk else "global"
            for dtype in (*sizes.check_dtypes, torch.float32):
                what = f"GSPN {side}x{side}x{channels} {variant} {dtype_name(dtype)}"
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
        f"{dtype_name(d)} {t:g}" for d, t in TOLERANCE.items()) + ". 16-bit GSPN runs store one rounding of an "
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
        sync(device)
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
            rows.append([label, tokens, method, window, seconds_text(seconds),
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
        f"{dtype_name(dtype)}, batch 1, one direction per call. Bytes moved = every element the kernels load and "
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
            rows.append([budget_text(budget), "refused", "", "", "", "", "", "", f"{error}".split("\n")[0][:80]])
            continue
        plan = plan_stage(weights, out, out, options)
        start = time.perf_counter()
        peak = guarded(section, what, lambda: measure(weights, lr, options, device))
        seconds = time.perf_counter() - start
        if peak is None:
            continue
        last = seconds
        per_eval = seconds / evaluations(options.steps)
        rows.append([budget_text(budget), str(plan.n), "yes" if options.offload else "no", budget_text(plan.total),
                     budget_text(peak), "yes" if peak <= budget else "NO", f"{per_eval:.2f}", f"{growth * per_eval:.1f}",
                     f"{growth * per_eval * evaluations(default_steps):.0f}"])
    section.notes.append("Peak = torch.cuda.max_memory_allocated around the upscale (weights included); on the CPU "
                         "(dry run) the live-tensor meter of benchmarks/infdit_memory.py. The timed run includes "
                         "CLIP, preparation and the block scheduling, so 's per evaluation' is an upper bound.")

