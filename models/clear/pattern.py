"""CLEAR's window settings and the high-resolution recipe's softmax scale and RoPE base.

A released file is ``clear_local_<radius>[_down_<factor>].safetensors`` (Huage001/CLEAR on
Hugging Face). The files carry no metadata; files re-saved with safetensors metadata
``window_size`` / ``down_factor`` (the reference training script's argument names) are read
from it first.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from ...kernels import covering_radius

RELEASED_NAME = re.compile(r"clear_local_(\d+)(?:_down_(\d+))?", re.IGNORECASE)
METADATA_RADIUS = "window_size"
METADATA_DOWN_FACTOR = "down_factor"
# The sequence length FLUX was distilled at: 64x64 image tokens + 512 text tokens.
TRAIN_SEQUENCE = 64 ** 2 + 512
# The down-sampled variant's proportional scale counts ten times the keys (reference code).
DOWN_SAMPLED_KEY_FACTOR = 10


@dataclass(frozen=True)
class ClearPattern:
    """Window radius (image tokens with ``dy**2 + dx**2 < radius**2``) and down factor (1 = no
    down-sampled keys)."""

    radius: int
    down_factor: int = 1

    def __post_init__(self) -> None:
        if self.radius < 1:
            raise ValueError(f"CLEAR window radius must be >= 1, got {self.radius}")
        if self.down_factor < 1:
            raise ValueError(f"CLEAR down factor must be >= 1, got {self.down_factor}")

    def covers(self, grid: tuple[int, int]) -> bool:
        """True when every window holds the whole grid (the pattern is then dense on images)."""
        return self.radius >= covering_radius(grid)


def _metadata_int(metadata: Mapping[str, str] | None, key: str, filename: str) -> int | None:
    if not metadata or key not in metadata:
        return None
    try:
        return int(metadata[key])
    except ValueError:
        raise ValueError(f"{filename}: metadata {key}={metadata[key]!r} is not an integer") from None


def resolve_pattern(filename: str | None, metadata: Mapping[str, str] | None = None, spatial_size: int | None = None,
                    radius: int = 0, down_factor: int = 0) -> ClearPattern:
    """The pattern to run: the file's metadata, else its released name, else (for the down
    factor) the side ``spatial_size`` of its ``spatial_weight``; ``radius``/``down_factor``
    (0 = the file's) are needed where the file does not say, and must agree with it where it
    does: weights fine-tuned for one window are refused for another.

    ``filename=None`` means no weights file (window-only): the radius must then be given and the
    down factor defaults to 1.
    """
    match = RELEASED_NAME.search(filename) if filename else None
    name_radius = int(match.group(1)) if match else None
    name_down = int(match.group(2)) if match and match.group(2) else (1 if match else None)
    meta_radius = _metadata_int(metadata, METADATA_RADIUS, filename or "")
    meta_down = _metadata_int(metadata, METADATA_DOWN_FACTOR, filename or "")
    file_radius = meta_radius or name_radius
    file_down = meta_down or name_down or spatial_size
    for setting, asked, stated, from_metadata in (("window_radius", radius, file_radius, meta_radius),
                                                  ("down_factor", down_factor, file_down, meta_down)):
        if asked and stated and asked != stated:
            source = "its metadata" if from_metadata else "its name" if match else "its spatial_weight"
            raise ValueError(f"{filename} holds CLEAR weights made for {setting} {stated} ({source} says so), but "
                             f"{setting} is set to {asked}: set it to 0 (the file's) or {stated}, or choose a file "
                             f"made for {asked} (CLEAR Distill makes one)")
    chosen_radius = radius or file_radius
    if not chosen_radius:
        source = f"{filename} has no {METADATA_RADIUS!r} metadata and no clear_local_<radius> name" if filename \
            else "no CLEAR weights file is selected"
        raise ValueError(f"cannot tell the CLEAR window radius: {source}; set window_radius")
    chosen_down = down_factor or file_down or 1
    if spatial_size is not None and spatial_size != chosen_down:
        raise ValueError(f"{filename} was trained with down factor {spatial_size} (its spatial_weight is "
                         f"{spatial_size}x{spatial_size}) but down factor {chosen_down} was asked for")
    return ClearPattern(chosen_radius, chosen_down)


def softmax_scale(head_dim: int, n_keys: int, proportional: bool, down_sampled: bool) -> float:
    """``1/sqrt(d)``, or with proportional attention ``sqrt(log_4608(n) / d)`` where ``n`` is the
    number of real keys (text + image + reference), times 10 in the down-sampled variant."""
    if not proportional:
        return head_dim ** -0.5
    n = n_keys * (DOWN_SAMPLED_KEY_FACTOR if down_sampled else 1)
    return math.sqrt(math.log(n, TRAIN_SEQUENCE) / head_dim)


def ntk_theta(base_theta: float, ntk_factor: float) -> float:
    """NTK-scaled RoPE base of the high-resolution recipe: every axis' base times the factor."""
    if ntk_factor < 1:
        raise ValueError(f"NTK factor must be >= 1, got {ntk_factor}")
    return base_theta * ntk_factor
