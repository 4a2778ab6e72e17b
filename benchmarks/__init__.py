"""Benchmarks that print speed and memory ratios measured side by side in one run.

Each benchmark module has ``main(argv) -> None`` and is listed in :data:`BENCHMARKS`;
``python -m ultrares.benchmarks`` runs the :data:`DEFAULT` ones (``--quick`` for the small
sizes, which is the pack's download-free demo on built-in tiny models); ``gpu`` writes the
prepared GPU report (``benchmarks/gpu.py``: the run; ``gpu_sections.py``: what it measures;
``gpu_sizes.py``: at which sizes, and how numbers are worded; ``gpu_report.py``: the report).
"""

from __future__ import annotations

__all__ = [
    "BENCHMARKS",   # benchmark name -> its module, for python -m ultrares.benchmarks NAME
    "DEFAULT",      # the benchmarks that run without names (the CPU ones)
]

BENCHMARKS: dict[str, str] = {
    "clear": ".clear_attention",
    "clear-parallel": ".clear_parallel",
    "gspn": ".gspn",
    "infdit": ".infdit_memory",
    "infdit-distributed": ".infdit_distributed",
    "gpu": ".gpu",
}
DEFAULT: tuple[str, ...] = ("clear", "clear-parallel", "gspn", "infdit", "infdit-distributed")
"""What runs without names: the CPU benchmarks (``gpu`` needs a GPU, or ``--dry``)."""
