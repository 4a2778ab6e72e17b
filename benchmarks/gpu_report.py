"""The GPU report's bookkeeping: time-capped sections, their tables, what was skipped and why,
and the markdown file (``python -m ultrares.benchmarks gpu``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..models import write_atomically

# Peak DRAM bandwidth (GB/s) from the vendors' data sheets, matched against the device name in
# order (first match wins): the reference for "fraction of the device's bandwidth".
PEAK_BANDWIDTH_GBS: tuple[tuple[str, float], ...] = (
    ("gh200", 4000.0), ("h200", 4800.0), ("h100 nvl", 3900.0), ("h100 pcie", 2000.0), ("h100", 3350.0),
    ("b200", 8000.0), ("a100-sxm4-80gb", 2039.0), ("a100 80gb pcie", 1935.0), ("a100", 1555.0),
    ("l40s", 864.0), ("l40", 864.0), ("l4", 300.0), ("a10", 600.0), ("t4", 320.0), ("v100", 900.0),
    ("rtx 5090", 1792.0), ("rtx 4090", 1008.0), ("rtx 4080", 717.0), ("rtx 3090", 936.0), ("rtx 3080", 760.0),
)


def table_bandwidth(device_name: str) -> float | None:
    """Data-sheet peak bandwidth of a GPU by its name, GB/s; None for a GPU not in the table."""
    name = device_name.lower()
    return next((gbs for key, gbs in PEAK_BANDWIDTH_GBS if key in name), None)


@dataclass
class Section:
    """One part of the report with its own time cap (seconds of wall time)."""

    title: str
    cap: float
    intro: str = ""
    tables: list[tuple[list[str], list[list[str]]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None

    def remaining(self) -> float:
        return self.cap - (time.perf_counter() - self.started)

    def fits(self, estimate: float, what: str) -> bool:
        """Whether a measurement estimated at ``estimate`` s fits the time left; records a skip if not."""
        if estimate <= self.remaining():
            return True
        self.skipped.append(f"{what}: estimated {estimate:.1f} s, {max(self.remaining(), 0):.1f} s left of the "
                            f"section's {self.cap:.0f} s")
        return False

    def table(self, header: list[str]) -> list[list[str]]:
        """A new table; rows appended to the returned list are printed in order."""
        rows: list[list[str]] = []
        self.tables.append((header, rows))
        return rows

    def close(self) -> None:
        self.finished = time.perf_counter()

    @property
    def seconds(self) -> float:
        return (self.finished or time.perf_counter()) - self.started


def guarded(section: Section, what: str, fn: Callable[[], object]) -> object | None:
    """Run ``fn``; an exception becomes a line in the section's skipped list, not a crash."""
    try:
        return fn()
    except Exception as error:  # one failing measurement must not cost the rest of the run
        section.skipped.append(f"{what}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        return None


def markdown(title: str, header_lines: list[str], sections: list[Section], total_seconds: float) -> str:
    lines = [f"# {title}", ""] + [f"- {line}" for line in header_lines] + [f"- wall time of the run: {total_seconds:.0f} s", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        if section.intro:
            lines += [section.intro, ""]
        for header, rows in section.tables:
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(row) + " |" for row in rows]
            lines.append("")
        lines += [f"{note}" for note in section.notes]
        if section.notes:
            lines.append("")
        if section.skipped:
            lines.append("Skipped or failed:")
            lines += [f"- {line}" for line in section.skipped]
            lines.append("")
        lines += [f"Section time: {section.seconds:.1f} s of its {section.cap:.0f} s cap.", ""]
    return "\n".join(lines)


def write(path: Path, text: str) -> Path:
    """Write the report atomically: a run stopped while writing leaves the previous report whole."""
    with write_atomically(path) as partial:
        partial.write_text(text)
    return path
