"""Benchmarks that print speed and memory ratios measured side by side in one run.

Each benchmark module has ``main(argv) -> None`` and is listed in :data:`BENCHMARKS`;
``python -m ultrares.benchmarks`` runs them all (``--quick`` for the small sizes, which is
the pack's download-free demo on built-in tiny models).
"""

from __future__ import annotations

BENCHMARKS: dict[str, str] = {
    "clear": ".clear_attention",
    "gspn": ".gspn",
    "infdit": ".infdit_memory",
    "infdit-distributed": ".infdit_distributed",
}
