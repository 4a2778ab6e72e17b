"""The benchmark runner (`python -m ultrares.benchmarks`) and its registry."""

from __future__ import annotations

import importlib

import pytest

from ultrares import benchmarks
from ultrares.benchmarks.__main__ import main


def test_every_registered_benchmark_imports_and_has_a_main():
    assert set(benchmarks.BENCHMARKS) == {"clear", "gspn", "infdit", "gpu"}
    assert "gpu" not in benchmarks.DEFAULT  # needs a GPU (or --dry): never part of the CPU run
    for module_name in benchmarks.BENCHMARKS.values():
        module = importlib.import_module(module_name, "ultrares.benchmarks")
        assert callable(module.main)


def test_runner_refuses_an_unknown_benchmark(capsys):
    with pytest.raises(SystemExit):
        main(["nonesuch"])
    assert "unknown benchmark" in capsys.readouterr().err
