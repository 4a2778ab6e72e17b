"""Where a CLEAR distillation keeps the teacher's samples: in memory, or in a folder beside the
weights file so that a resumed run does not sample them again.

A sample costs a whole trajectory of the teacher (20-50 forward passes), and the reference
trains on each one many times (its 10K images over 10K steps of 32). The folder holds one
``<index>.latent`` file per sample (safetensors, the format of ComfyUI's own ``.latent``
files; not a model-file extension, so ComfyUI's model lists do not show them) and
``recipe.json``: what made them (model, prompts, size, steps, CFG, seed). A folder made by
another recipe is emptied before use, so samples of another run are never mixed in.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from ..weight_files import save_safetensors

RECIPE = "recipe.json"
SUFFIX = ".latent"
KEY = "latent"

log = logging.getLogger(__name__)


class MemorySamples:
    """Samples in memory (a later run samples them again)."""

    def __init__(self) -> None:
        self.samples: dict[int, torch.Tensor] = {}

    def get(self, index: int) -> torch.Tensor | None:
        """Sample ``index``, or None if it was not made yet."""
        return self.samples.get(index)

    def put(self, index: int, latent: torch.Tensor) -> None:
        """Keep sample ``index``."""
        self.samples[index] = latent


class FolderSamples:
    """Samples in ``folder``, valid for ``recipe`` (a JSON-able mapping)."""

    def __init__(self, folder: str | os.PathLike, recipe: Mapping[str, object]):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        wanted = json.loads(json.dumps(dict(recipe), sort_keys=True))
        recipe_path = self.folder / RECIPE
        found = json.loads(recipe_path.read_text()) if recipe_path.is_file() else None
        if found != wanted:
            stale = list(self.folder.glob("*" + SUFFIX))
            if stale:
                changed = sorted(key for key in set(wanted) | set(found or {})
                                 if (found or {}).get(key) != wanted.get(key))
                log.info("CLEAR distill: the %d teacher samples in %s were made with another %s; they are made "
                         "again", len(stale), self.folder.name, ", ".join(changed))
            for path in stale:
                path.unlink()
            recipe_path.write_text(json.dumps(wanted, sort_keys=True, indent=1))

    def _path(self, index: int) -> Path:
        return self.folder / f"{index:06d}{SUFFIX}"

    def get(self, index: int) -> torch.Tensor | None:
        """Sample ``index``, or None if it was not made yet (or its file is unreadable)."""
        path = self._path(index)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(KEY)
        except Exception:  # a file cut short by a crash: the sample is made again
            return None

    def put(self, index: int, latent: torch.Tensor) -> None:
        """Write sample ``index`` (atomically)."""
        save_safetensors({KEY: latent.detach().to("cpu").contiguous()}, self._path(index))

    def __len__(self) -> int:
        return sum(1 for _ in self.folder.glob("*" + SUFFIX))
