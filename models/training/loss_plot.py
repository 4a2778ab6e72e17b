"""A loss curve drawn with PIL (no plotting library is a dependency of the pack)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

_MARGIN_LEFT, _MARGIN_RIGHT, _MARGIN_TOP, _MARGIN_BOTTOM = 64, 16, 28, 36
NOTE_HEIGHT = 16
"""Pixels per line of notes under the plot."""
_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40))


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def draw_loss_plot(series: dict[str, Sequence[float]], width: int = 640, height: int = 360,
                   first_step: int = 1, notes: Sequence[str] = ()) -> np.ndarray:
    """``(height + 16 * len(notes), width, 3)`` uint8 plot of up to four named loss series (log
    scale, smoothed line), with ``notes`` written under it, one line each.

    Step ``i`` of every series is plotted at ``first_step + i``.
    """
    if len(series) > len(_COLOURS):
        raise ValueError(f"at most {len(_COLOURS)} loss series fit one plot, got {len(series)}")
    image = Image.new("RGB", (width, height + NOTE_HEIGHT * len(notes)), "white")
    draw = ImageDraw.Draw(image)
    for index, note in enumerate(notes):
        draw.text((8, height + NOTE_HEIGHT * index), note, fill=(0, 0, 0))
    left, right = _MARGIN_LEFT, width - _MARGIN_RIGHT
    top, bottom = _MARGIN_TOP, height - _MARGIN_BOTTOM
    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    series = {name: [v for v in values if math.isfinite(v) and v > 0] for name, values in series.items()}
    series = {name: values for name, values in series.items() if values}
    if not series:
        draw.text((left + 8, top + 8), "no loss values yet", fill=(0, 0, 0))
        return np.asarray(image)
    low = math.log10(min(min(v) for v in series.values()))
    high = math.log10(max(max(v) for v in series.values()))
    if high - low < 1e-6:
        low, high = low - 0.5, high + 0.5
    steps = max(len(v) for v in series.values())

    def to_xy(i: int, value: float) -> tuple[float, float]:
        x = left + (right - left) * (i / max(steps - 1, 1))
        y = bottom - (bottom - top) * (math.log10(value) - low) / (high - low)
        return x, y

    for (name, values), colour in zip(series.items(), _COLOURS):
        faint = tuple(255 - (255 - c) // 3 for c in colour)
        if len(values) > 1:
            draw.line([to_xy(i, v) for i, v in enumerate(values)], fill=faint, width=1)
            smooth = _smooth(values, max(1, len(values) // 50))
            draw.line([to_xy(i, v) for i, v in enumerate(smooth)], fill=colour, width=2)
        else:
            x, y = to_xy(0, values[0])
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
    x = left
    for (name, values), colour in zip(series.items(), _COLOURS):
        label = f"{name}: {values[-1]:.4g}"
        draw.text((x, 8), label, fill=colour)
        x += int(draw.textlength(label)) + 24
    for value in (10 ** high, 10 ** low):
        _, y = to_xy(0, value)
        draw.text((4, y - 6), f"{value:.3g}", fill=(0, 0, 0))
    draw.text((left, bottom + 8), f"step {first_step}", fill=(0, 0, 0))
    draw.text((right - 80, bottom + 8), f"step {first_step + steps - 1}", fill=(0, 0, 0))
    draw.text(((left + right) // 2 - 40, bottom + 20), "log scale", fill=(90, 90, 90))
    return np.asarray(image)
