"""The prepared GPU run (`python -m ultrares.benchmarks gpu`), in its dry mode: tiny sizes on the
CPU with Triton's interpreter, through the benchmark runner, writing the whole report. This
checks the plumbing and the report's format, not any speed."""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from ultrares.benchmarks import gpu
from ultrares.benchmarks.__main__ import main as run_benchmarks

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def _fake_comfy_kitchen(calls: list[str]) -> types.ModuleType:
    """comfy-kitchen's two attention entry points with their documented layouts, in plain PyTorch."""
    module = types.ModuleType("comfy_kitchen")
    module.__version__ = "test stand-in"

    def na2d(q, k, v, kernel_size):
        b, h, w, heads, dim = q.shape  # (B, H, W, heads, D)
        calls.append(f"na2d {tuple(q.shape)} {kernel_size}")
        flat = [t.reshape(b, h * w, heads, dim).transpose(1, 2) for t in (q, k, v)]
        return F.scaled_dot_product_attention(*flat).transpose(1, 2).reshape(q.shape)

    def sol_attn(q, k, v, tau):
        calls.append(f"sol_attn {tuple(q.shape)} {tau}")  # (B, T, heads, D)
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)

    module.na2d, module.sol_attn = na2d, sol_attn
    return module


def _table_rows(report: str, section: str) -> list[list[str]]:
    part = report.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in part.splitlines()
            if line.startswith("| ") and not line.startswith("|---")][1:]


def test_dry_run_writes_every_section_of_the_report(tmp_path, monkeypatch, triton_device):
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "comfy_kitchen", _fake_comfy_kitchen(calls))
    out = tmp_path / "report.md"
    run_benchmarks(["gpu", "--dry", "--out", str(out)])
    report = out.read_text()
    assert report.startswith("# UltraRes GPU report (dry run: format only)")
    for line in ("- date: ", "- machine: CPU ", "- torch ", "triton ", "- DRY RUN on the CPU", "- wall time of the run"):
        assert line in report
    assert "Skipped or failed" not in report, report

    exact = _table_rows(report, "(a)")
    kernels = {(row[0], row[2], row[3]) for row in exact}
    assert ("CLEAR", "bfloat16", "triton") in kernels and ("CLEAR", "float32", "auto -> torch") in kernels
    assert {"GSPN forward", "GSPN backward (dx)", "GSPN backward (dlam)", "GSPN backward (dlogits)"} <= {
        row[0] for row in exact}
    assert all(row[-1] == "yes" for row in exact), exact

    timed = _table_rows(report, "(b)")
    methods = {row[2] for row in timed}
    assert {"dense SDPA", "pack (auto -> torch)", "FlexAttention (eager)", "comfy-kitchen sol_attn (tau 1)",
            "comfy-kitchen na2d (15x15, image only)"} <= methods, methods
    assert all(float(row[4]) > 0 for row in timed)
    side = gpu.DRY.grids["2K"]
    assert f"na2d (1, {side}, {side}, {gpu.DRY.heads_time}, {gpu.DRY.head_dim}) 15" in calls
    assert f"sol_attn (1, {gpu.DRY.text + side * side}, {gpu.DRY.heads_time}, {gpu.DRY.head_dim}) 1.0" in calls

    from ultrares.kernels._gspn_plan import traffic

    bandwidth = _table_rows(report, "(c)")
    assert len(bandwidth) == 2 * 2 * len(gpu.DRY.gspn_maps)  # chunk 4 / global x inference / training
    (first_side, channels) = gpu.DRY.gspn_maps[0]
    moved = traffic((1, first_side, first_side, channels), 0, 4, torch.float32).total
    assert bandwidth[0][6] == f"{moved / 1e6:.2f}"

    budgets = _table_rows(report, "(d)")
    assert budgets[0][1] == "refused" and all(row[5] == "yes" for row in budgets[1:]), budgets


def test_sections_out_of_time_are_skipped_and_say_so(tmp_path, monkeypatch):
    caps = dict.fromkeys(gpu.DRY.caps, 0.0)
    monkeypatch.setattr(gpu, "DRY", dataclasses.replace(gpu.DRY, caps=caps))
    out = tmp_path / "report.md"
    gpu.main(["--dry", "--out", str(out)])
    report = out.read_text()
    assert report.count("Skipped or failed:") == 4
    assert "estimated" in report and "s left of the section's 0 s" in report


def test_without_a_gpu_the_full_run_refuses_and_points_to_the_dry_mode(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the full run would start")
    with pytest.raises(SystemExit):
        gpu.main([])
    assert "--dry" in capsys.readouterr().err
