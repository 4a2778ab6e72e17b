"""Print the README's CLEAR Distill cost tables (memory and time for FLUX.1-size models) from
the stated model in ``models/clear/training_cost.py``: estimates, not measurements.

    python scripts/clear_distill_cost.py            # both tables
    python scripts/clear_distill_cost.py --readme   # the block between the README's markers
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- clear-distill-cost -->", "<!-- /clear-distill-cost -->"


def _bind_checkout() -> None:
    """Import this checkout as ``ultrares`` (the repository root is the package)."""
    spec = importlib.util.spec_from_file_location("ultrares", REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["ultrares"] = module
    spec.loader.exec_module(module)


def readme_block() -> str:
    """What the README holds between its markers."""
    from ultrares.models.clear.training_cost import (RECIPE_RESOLUTION, RECIPE_SAMPLING_STEPS, memory_table,
                                                     time_table)

    return (f"Memory (GiB, estimate; one sample at a time, so the batch size does not change it):\n\n{memory_table()}\n\n"
            f"Time (hours, estimate) at {RECIPE_RESOLUTION}² with {RECIPE_SAMPLING_STEPS}-step teacher samples, with "
            f"the first of bf16 weights, fp8 weights, fp8 weights with the optimizer in RAM that fits:\n\n{time_table()}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", action="store_true", help="print the README block with its markers")
    args = parser.parse_args(argv)
    if "ultrares" not in sys.modules:
        _bind_checkout()
    block = readme_block()
    print(f"{BEGIN}\n{block}\n{END}" if args.readme else block)


if __name__ == "__main__":
    main()
