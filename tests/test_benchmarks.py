"""The benchmark runner (`python -m ultrares.benchmarks`) and its registry."""

from __future__ import annotations

import importlib

import pytest

from ultrares import benchmarks
from ultrares.benchmarks.__main__ import main


def test_every_registered_benchmark_imports_and_has_a_main():
    assert set(benchmarks.BENCHMARKS) == {"clear", "clear-parallel", "gspn", "infdit", "infdit-distributed", "gpu"}
    assert "gpu" not in benchmarks.DEFAULT  # needs a GPU (or --dry): never part of the CPU run
    for module_name in benchmarks.BENCHMARKS.values():
        module = importlib.import_module(module_name, "ultrares.benchmarks")
        assert callable(module.main)


def test_runner_refuses_an_unknown_benchmark(capsys):
    with pytest.raises(SystemExit):
        main(["nonesuch"])
    assert "unknown benchmark" in capsys.readouterr().err


def test_the_traffic_table_counts_the_stated_formulas(capsys):
    from ultrares.benchmarks import clear_parallel as cp
    from ultrares.models.clear.pattern import ClearPattern

    channels = 2 * 3072 * 2  # a key and a value, bfloat16
    # 8K on 2 devices, radius 16: 15 rows each way across the one boundary
    parts = cp.clear_layer_bytes(512, 2, ClearPattern(16))
    assert parts["halo"] == 2 * 15 * 512 * channels
    assert parts["text"] == 2 * 512 * 24 * (1 + 129) * 4  # two ring all-reduces of float32 partials
    cells = cp.clear_layer_bytes(512, 4, ClearPattern(16, 4))["cells"]
    assert cells == 3 * (128 * 128) * channels
    assert cp.ulysses_layer_bytes(512, 4) == 4 * 512 * 512 * 3072 * 2 * 3 // 4
    assert cp.ring_layer_bytes(512, 4) == 3 * 512 * 512 * channels
    cp.traffic_table()
    table = capsys.readouterr().out
    assert "| 8K | 8 |" in table and "Ulysses / CLEAR r16" in table


def test_the_distributed_benchmark_models_the_released_configuration(capsys):
    from ultrares.benchmarks.infdit_distributed import modelled

    modelled(sizes=(4096,), ranks_list=(1, 2))
    out = capsys.readouterr().out
    assert "| 4096x4096 | 1 | 16 | 100.0% | 1.00 |" in out
    assert "| 4096x4096 | 2 |" in out and "round-robin" in out
