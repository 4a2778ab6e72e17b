"""Run the pack's benchmarks: ``python -m ultrares.benchmarks [--quick] [NAME ...] [-- options]``.

Without names every CPU benchmark runs; ``gpu`` (the prepared GPU report) runs only when named.
Options the runner does not know go to each named benchmark (e.g. ``gpu --dry``).
"""

from __future__ import annotations

import argparse
import importlib

from . import BENCHMARKS, DEFAULT
from .machine import stamp


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ultrares.benchmarks", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run, of {sorted(BENCHMARKS)} (default: {DEFAULT})")
    parser.add_argument("--quick", action="store_true", help="small sizes only (about two minutes for all three on 2 CPU cores)")
    args, extra = parser.parse_known_args(argv)
    unknown = sorted(set(args.names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {sorted(BENCHMARKS)}")
    print(f"# run: {stamp()}")
    for name in args.names or DEFAULT:
        print(f"\n## {name}")
        importlib.import_module(BENCHMARKS[name], __package__).main((["--quick"] if args.quick else []) + extra)


if __name__ == "__main__":
    main()
