"""Run the pack's benchmarks: ``python -m ultrares.benchmarks [--quick] [NAME ...]``."""

from __future__ import annotations

import argparse
import importlib

from . import BENCHMARKS
from .machine import describe_machine


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ultrares.benchmarks", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run, of {sorted(BENCHMARKS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes only (about two minutes for all three on 2 CPU cores)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {sorted(BENCHMARKS)}")
    print(f"# machine: {describe_machine()}")
    for name in args.names or list(BENCHMARKS):
        print(f"\n## {name}")
        importlib.import_module(BENCHMARKS[name], __package__).main(["--quick"] if args.quick else [])


if __name__ == "__main__":
    main()
