"""One line that says which machine a benchmark table came from."""

from __future__ import annotations

import datetime
import os
import platform

import torch


def describe_machine() -> str:
    """CPU, core count, torch build and GPU (if any): printed above every benchmark table."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    parts = [f"CPU {cpu} ({os.cpu_count()} cores)", f"torch {torch.__version__}"]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        parts.append(f"GPU {props.name} ({props.total_memory / 2**30:.0f} GiB)")
    else:
        parts.append("no GPU")
    return ", ".join(parts)


def stamp() -> str:
    """Date and machine, the line every benchmark prints above its tables."""
    return f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {describe_machine()}"
