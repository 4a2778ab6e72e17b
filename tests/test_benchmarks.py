"""The benchmark runner (`python -m ultrares.benchmarks`) and its registry."""

from __future__ import annotations

import importlib

import pytest

from ultrares import benchmarks
from ultrares.benchmarks.__main__ import main


def test_every_registered_benchmark_imports_and_has_a_main():
    assert set(benchmarks.BENCHMARKS) == {"clear", "gspn", "infdit", "infdit-distributed", "gpu"}
    assert "gpu" not in benchmarks.DEFAULT  # needs a GPU (or --dry): never part of the CPU run
    for module_name in benchmarks.BENCHMARKS.values():
        module = importlib.import_module(module_name, "ultrares.benchmarks")
        assert callable(module.main)


def test_runner_refuses_an_unknown_benchmark(capsys):
    with pytest.raises(SystemExit):
        main(["nonesuch"])
    assert "unknown benchmark" in capsys.readouterr().err


def test_the_distributed_benchmark_models_the_released_configuration(capsys):
    from ultrares.benchmarks.infdit_distributed import modelled

    modelled(sizes=(4096,), ranks_list=(1, 2))
    out = capsys.readouterr().out
    assert "| 4096x4096 | 1 | 16 | 100.0% | 1.00 |" in out
    assert "| 4096x4096 | 2 |" in out and "round-robin" in out
