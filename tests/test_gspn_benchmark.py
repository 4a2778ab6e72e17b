"""The GSPN benchmark runs through the pack's benchmark entry point and prints its table
(tiny grids: this checks the script, not the speed)."""

from __future__ import annotations

from ultrares.benchmarks.__main__ import main as run_benchmarks


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_gspn_benchmark_prints_one_row_per_grid_with_steps_and_speedups(capsys, monkeypatch):
    from ultrares.benchmarks import gspn

    monkeypatch.setitem(gspn.QUICK_SIDES, "cpu", (6, 9))
    run_benchmarks(["gspn", "--quick"])
    lines = capsys.readouterr().out.splitlines()
    header = _cells(next(line for line in lines if line.startswith("| grid")))
    assert header[2:6] == ["SDPA", "GSPN op chunk 4 (torch)", "GSPN op global (torch)", "GSPN layer"]
    rows = [dict(zip(header, _cells(line))) for line in lines if line.startswith(("| 6x6", "| 9x9"))]
    assert [row["steps chunk 4 / global"] for row in rows] == ["4 / 6", "4 / 9"]
    for row in rows:
        assert all(float(row[name]) >= 0 for name in header[2:6]), row
        assert all(row[name].endswith("x") for name in header[-3:]), row
