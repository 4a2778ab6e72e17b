"""The compiled-kernel table: what Triton's compiler made of every kernel build of the pack, per
GPU architecture (shared memory, registers, spills, tensor cores, asynchronous copies).

``kernels/compiled_kernels.json`` is written by ``scripts/compiled_kernels.py --write`` from
ahead-of-time builds (:mod:`.aot`) and checked against fresh builds by
``tests/test_compiled_kernels.py``, so it cannot go stale. Dispatch reads it to know, without
trying, which launch configuration of a kernel fits a GPU's shared memory, and to use a kernel
only on architectures it was built and checked for. The figures are those of the Triton version
the table names; another version may allocate differently, so the kernels still fall back to a
smaller launch when a GPU refuses one.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

__all__ = ["TABLE_PATH", "markdown", "rows", "shared_memory", "triton_version", "write"]

TABLE_PATH = Path(__file__).with_name("compiled_kernels.json")


@functools.cache
def _table() -> dict:
    return json.loads(TABLE_PATH.read_text())


def rows(kernel: str | None = None) -> list[dict]:
    """The table's rows, optionally of one kernel."""
    return [r for r in _table()["builds"] if kernel is None or r["kernel"] == kernel]


def triton_version() -> str:
    """The Triton version the table was compiled with."""
    return _table()["triton"]


def shared_memory(kernel: str, dtype: torch.dtype, arch: int) -> dict[str, int]:
    """Shared memory (bytes) per program of each launch configuration of ``kernel`` built for
    ``dtype`` on ``sm_<arch>``, in the kernel's order of preference; empty if none was built."""
    name = str(dtype).removeprefix("torch.")
    return {r["config"]: r["shared"] for r in rows(kernel) if r["dtype"] == name and r["arch"] == arch}


def write(reports: list[dict]) -> None:
    """Replace the table with fresh build reports (``scripts/compiled_kernels.py --write``)."""
    import triton

    table = {"triton": triton.__version__,
             "about": "written by scripts/compiled_kernels.py --write, checked by tests/test_compiled_kernels.py",
             "builds": reports}
    TABLE_PATH.write_text(json.dumps(table, indent=1) + "\n")
    _table.cache_clear()


def _cell(row: dict) -> str:
    copies = row["async_copies"]
    prefetch = "async copies" if copies and all(copies.values()) else "no async copies"
    return (f"{row['shared'] / 1024:g} KiB, {row['registers']} regs, spills {row['spill_stores']}/{row['spill_loads']} B, "
            f"{'FMA' if row['tensor_cores'] == 'none' else row['tensor_cores']}, {prefetch}")


def markdown(kernel: str, table_rows: list[dict] | None = None) -> str:
    """``kernel``'s builds as a markdown table (a row per launch configuration and dtype, a column
    per architecture; dtypes with equal figures share a row), as the README prints it."""
    table_rows = rows(kernel) if table_rows is None else [r for r in table_rows if r["kernel"] == kernel]
    archs = sorted({r["arch"] for r in table_rows})
    cells: dict[tuple[str, str], dict[int, str]] = {}
    for r in table_rows:
        cells.setdefault((r["config"], r["dtype"]), {})[r["arch"]] = _cell(r)
    merged: dict[tuple[str, tuple], list[str]] = {}
    for (config, dtype), by_arch in cells.items():
        merged.setdefault((config, tuple(by_arch.get(a, "—") for a in archs)), []).append(dtype)
    lines = ["| launch | dtype | " + " | ".join(f"sm_{a}" for a in archs) + " |",
             "|---|---|" + "---|" * len(archs)]
    for (config, by_arch), dtypes in merged.items():
        lines.append(f"| {config} | {' / '.join(dtypes)} | " + " | ".join(by_arch) + " |")
    return "\n".join(lines)
