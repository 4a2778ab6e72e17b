"""Naming offending keys in error messages: the first few and how many more, so a misfit
weights file is identified without flooding the log with hundreds of names."""

from __future__ import annotations

from collections.abc import Sequence


def name_first(keys: Sequence[str], shown: int = 5) -> str:
    """``"a, b, c (+12 more)"``: the first ``shown`` keys and the count of the rest."""
    more = f" (+{len(keys) - shown} more)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more
