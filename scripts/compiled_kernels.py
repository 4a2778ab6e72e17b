"""Build every Triton kernel of the pack for real GPU targets and report what the compiler made of it.

    python scripts/compiled_kernels.py            # print the table (markdown), from fresh builds
    python scripts/compiled_kernels.py --write    # rewrite kernels/compiled_kernels.json (dispatch reads it)
    python scripts/compiled_kernels.py --json     # the reports as JSON on stdout (the tests read this)
    python scripts/compiled_kernels.py --readme   # reprint the README's tables from the committed table

No GPU is needed: Triton compiles ahead of time and its wheel ships ptxas. Builds are cached
(``ULTRARES_AOT_CACHE``, default ``~/.cache/ultrares/aot``); ``--jobs`` compiles in parallel.
See ``kernels/aot.py`` for what each column means.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for GPUs: the interpreter's jit functions cannot be compiled
REPO_ROOT = Path(__file__).resolve().parents[1]


def _bind_checkout() -> None:
    """Import this checkout as ``ultrares`` (the repository root is the package)."""
    spec = importlib.util.spec_from_file_location("ultrares", REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["ultrares"] = module
    spec.loader.exec_module(module)


def _report(index: int, arch: int) -> dict:
    from ultrares.kernels import aot

    return aot.build_report(aot.all_builds()[index], arch)


def reports(jobs: int) -> list[dict]:
    """One report per (build, architecture), in declaration order."""
    from ultrares.kernels import aot

    tasks = [(i, arch) for i, build in enumerate(aot.all_builds()) for arch in build.archs]
    if jobs <= 1:
        return [_report(i, arch) for i, arch in tasks]
    with ProcessPoolExecutor(jobs, initializer=_bind_checkout) as pool:
        return list(pool.map(_report, *zip(*tasks)))


def markdown(rows: list[dict]) -> str:
    lines = ["| kernel | launch | dtype | arch | shared KiB | registers | spills (stores/loads B) | tensor cores | "
             "async copies in pipelined loads |", "|---|---|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        copies = ", ".join(f"{name} {n}" for name, n in r["async_copies"].items()) or "—"
        lines.append(f"| {r['kernel']} | {r['config']} | {r['dtype']} | sm_{r['arch']} | {r['shared'] / 1024:g} | "
                     f"{r['registers']} | {r['spill_stores']}/{r['spill_loads']} | {r['tensor_cores']} | {copies} |")
    return "\n".join(lines)


def update_readme(compiled_table) -> None:
    """Replace the text between each ``<!-- compiled-kernels:KERNEL -->`` marker and the next
    ``<!-- /compiled-kernels -->`` with that kernel's table."""
    path = REPO_ROOT / "README.md"
    text = path.read_text()
    parts = text.split("<!-- compiled-kernels:")
    for i in range(1, len(parts)):
        kernel, rest = parts[i].split(" -->", 1)
        parts[i] = f"{kernel} -->\n{compiled_table.markdown(kernel)}\n<!-- /compiled-kernels -->" + \
            rest.split("<!-- /compiled-kernels -->", 1)[1]
    path.write_text("<!-- compiled-kernels:".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="rewrite kernels/compiled_kernels.json")
    parser.add_argument("--json", action="store_true", help="print the reports as JSON")
    parser.add_argument("--readme", action="store_true", help="reprint the README's tables (no build)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel builds")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    _bind_checkout()
    from ultrares.kernels import compiled_table

    if args.readme:
        update_readme(compiled_table)
        return

    rows = reports(args.jobs)
    if args.write:
        compiled_table.write(rows)
    print(json.dumps(rows) if args.json else markdown(rows))


if __name__ == "__main__":
    main()
