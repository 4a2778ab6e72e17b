"""A CLEAR file made by distillation: the released layout, so the patch node, LoRA tools and
code written for the released files read it unchanged, plus safetensors metadata:

- ``window_size`` / ``down_factor``: the reference training script's argument names, which the
  patch node reads before the file name (:func:`.pattern.resolve_pattern`);
- ``base_model``: the model it was distilled from, as the host names it;
- ``format`` (``ultrares.clear.distilled``) and ``training``: the training record as JSON
  (steps, every loss term per step, the last run's settings).

Tensors are kept in the model's own precision (bfloat16 for FLUX.1, like the released files);
the float32 values training updates live in the optimiser state beside the file, which is only
needed to resume.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from ..weight_files import SAFETENSORS, FileKind, read_weights, save_safetensors
from .distill import ClearTrainingRecord
from .pattern import METADATA_DOWN_FACTOR, METADATA_RADIUS, ClearPattern
from .student import ClearStudent
from .weights import CLEAR_WEIGHTS, ClearWeightsError

FORMAT = "ultrares.clear.distilled"
OPTIMIZER_FORMAT = "ultrares.clear.optimizer"
FILE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CLEAR_OPTIMIZER_STATE = FileKind(
    name="the optimizer state of a CLEAR distillation", error=ClearWeightsError, formats=(SAFETENSORS,),
    remedy=("Delete it to resume with a fresh optimizer (its first steps then move every weight by about the "
            "learning rate), or put back an intact copy."),
    holds=f"an optimizer state file carries '{OPTIMIZER_FORMAT}' metadata")


def file_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The precision a file for a model computing in ``model_dtype`` is saved in: the model's own
    float dtype; 8-bit and other storage formats get bfloat16."""
    return model_dtype if model_dtype in FILE_DTYPES else torch.bfloat16


def save_distilled(path: str | os.PathLike, student: ClearStudent, base_model: str, record: ClearTrainingRecord,
                   dtype: torch.dtype = torch.float32) -> None:
    """Write ``student`` as a released-layout CLEAR file with its metadata (atomically)."""
    metadata = {
        "format": FORMAT,
        METADATA_RADIUS: str(student.pattern.radius),
        METADATA_DOWN_FACTOR: str(student.pattern.down_factor),
        "base_model": base_model,
        "training": json.dumps(asdict(record)),
    }
    save_safetensors(student.file_tensors(dtype), path, metadata)


def read_distilled(path: str | os.PathLike, pattern: ClearPattern | None = None
                   ) -> tuple[dict[str, torch.Tensor], ClearPattern, str, ClearTrainingRecord]:
    """A distilled file's tensors, pattern, base model and record, to continue training it.

    Refuses files this pack's distillation did not write (a released file has no training
    record to continue) and, when ``pattern`` is given, files made for another window.
    """
    path = Path(path)
    tensors, meta = read_weights(path, CLEAR_WEIGHTS)
    if meta.get("format") != FORMAT:
        raise ClearWeightsError(f"{path.name} was not written by CLEAR Distill (no '{FORMAT}' metadata, e.g. a "
                                "released file): it has no training to continue. Choose another output name, or turn "
                                "resume off to start from the model's own weights")
    found = ClearPattern(int(meta[METADATA_RADIUS]), int(meta[METADATA_DOWN_FACTOR]))
    if pattern is not None and found != pattern:
        raise ClearWeightsError(f"{path.name} was distilled for window radius {found.radius} and down factor "
                             f"{found.down_factor}, not radius {pattern.radius} and down factor {pattern.down_factor}: "
                             "resume it with its own settings, or choose another output name")
    return tensors, found, meta.get("base_model", ""), ClearTrainingRecord(**json.loads(meta["training"]))
