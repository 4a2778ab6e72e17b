"""Inf-DiT's weight files as files: the two kinds the loader takes (the checkpoint and a
separate OpenCLIP tower) with the refusal each gets, which files can be the tower (told from
their tensor names, nothing loaded), and the safe reading of the released pickle.

The pickle is opened with ``torch.load(weights_only=True)``: besides tensors it may only
build the numpy types DeepSpeed stores its RNG state with. Any other pickled global is
refused by name (running it could execute code from the file), unless the caller names it
in ``allow_globals`` after deciding to trust the file; globals that run commands or code
(``os.system``, ``eval``, ``subprocess`` ...) are never allowed and never suggested.
"""

from __future__ import annotations

import _compat_pickle
import functools
import importlib
import re
from pathlib import Path

import numpy as np
import torch

from ..weight_files import (SAFETENSORS_SUFFIXES, FileKind, Loader, WeightFileError, read_safetensors, read_weights,
                            refuse_kind, state_dict_of, stored_keys)

CLIP_PREFIX = "clip."
"""The tower's names in a converted file start with this."""


class InfDiTCheckpointError(WeightFileError):
    """An Inf-DiT weight file (or CLIP tower) that is broken, of another kind, or not entirely what the
    loader needs; the message says why and what to do."""


INFDIT_CHECKPOINT = FileKind(
    name="an Inf-DiT checkpoint", error=InfDiTCheckpointError,
    remedy=("The Inf-DiT checkpoint is mp_rank_00_model_states.pt, linked from the THUDM/Inf-DiT README: download it "
            "(again) into models/infdit, or convert it (again) with cli/infdit_convert.py."),
    holds="Inf-DiT files hold keys such as transformer.layers.0.attention.query_key_value.weight (as released) or "
          "blocks.0.qkv.weight (converted)")
CLIP_TOWER = FileKind(
    name="an OpenCLIP image tower", error=InfDiTCheckpointError, also_accepts=("an Inf-DiT checkpoint",),
    remedy=("Inf-DiT's CLIP tower is open_clip_pytorch_model.bin of the Hugging Face repo "
            "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K: download it (again) into models/infdit or models/clip_vision, "
            "or choose 'from checkpoint'."),
    holds="OpenCLIP files hold keys such as visual.conv1.weight")


TOWER_KEYS = ("visual.conv1.weight", "conv1.weight", CLIP_PREFIX + "conv1.weight")
"""Names only a CLIP image tower has: an OpenCLIP file, a bare tower, a tower saved in the pack's names."""
DIT_KEY = re.compile(r"^(transformer\.layers\.\d+\.attention\.|mixins\.adaln_layer\.|blocks\.\d+\.qkv\.)")


@functools.lru_cache(maxsize=256)
def _stored_keys(path: str, size: int, modified: int) -> frozenset[str] | None:
    return stored_keys(path)


def holds_clip_tower(path: str | Path) -> bool:
    """Whether a file can be the loader's separate CLIP tower, told from its tensor names without
    loading it (cached while the file is unchanged): an OpenCLIP image tower, and never an Inf-DiT
    checkpoint (its own tower is "from checkpoint"). A file whose names cannot be read that way
    counts by its name ("clip" in it), so a broken download of the tower is still listed and
    refused with its reason when chosen."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError:
        return False
    keys = _stored_keys(str(path), info.st_size, info.st_mtime_ns)
    if keys is None:
        return "clip" in path.name.lower()
    return any(key in keys for key in TOWER_KEYS) and not any(DIT_KEY.match(key) for key in keys)


def not_a_clip_tower(path: str | Path) -> str | None:
    """Why a file that is not offered as the CLIP tower is not (what it is, where it belongs), from
    its tensor names; None when they cannot be read that way."""
    path = Path(path)
    keys = stored_keys(path)
    if keys is None:
        return None
    if any(DIT_KEY.match(key) for key in keys):
        return (f"{path.name} is an Inf-DiT checkpoint, not an OpenCLIP image tower: its own tower is 'from "
                f"checkpoint'. {CLIP_TOWER.remedy}")
    return str(refuse_kind(path, CLIP_TOWER, keys, None))



CODE_RUNNING_MODULES = frozenset({
    "builtins", "os", "posix", "nt", "sys", "subprocess", "shutil", "socket", "importlib", "runpy", "pty",
    "ctypes", "code", "codeop", "pickle", "_pickle", "marshal", "multiprocessing", "threading", "_thread", "signal",
    "asyncio", "types", "functools", "operator", "inspect", "pdb", "bdb", "webbrowser", "platform", "io", "_io",
    "pathlib", "tempfile", "glob", "timeit", "pydoc", "site", "zipimport", "copyreg", "imp", "urllib", "http",
})
"""Modules whose pickled globals can run commands or code (eval, os.system, subprocess.Popen,
getattr, functools.partial ...): never allowed, never suggested to a user."""


def _python3_name(name: str) -> str:
    """A pickled global as Python 3 names it: protocol-2 pickles use Python 2's module names
    (``commands.Popen`` is ``subprocess.Popen``) and torch drops the ``builtins.`` prefix."""
    module, _, attr = name.rpartition(".")
    if not module:
        return f"builtins.{name}"
    module, attr = _compat_pickle.NAME_MAPPING.get((module, attr), (module, attr))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{attr}"


def _runs_code(name: str) -> bool:
    return _python3_name(name).split(".")[0] in CODE_RUNNING_MODULES


def _allowed_pickle_globals(extra: tuple[str, ...]) -> list:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct

    allowed: list = [(_reconstruct, "numpy.core.multiarray._reconstruct"),
                     (_reconstruct, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype]
    allowed += [cls for name in dir(np.dtypes) if isinstance(cls := getattr(np.dtypes, name), type)]
    for name in extra:
        if _runs_code(name):
            raise InfDiTCheckpointError(f"will not allow the pickled global {name!r}: it can run commands or code, which "
                                  "a weights file never needs")
        module, _, attr = name.rpartition(".")
        try:
            allowed.append((getattr(importlib.import_module(module), attr), name))
        except (ImportError, AttributeError) as error:
            raise InfDiTCheckpointError(f"cannot allow pickled global {name!r}: {error}") from error
    return allowed


def _refused_global(error: Exception) -> str | None:
    text = str(error)
    match = (re.search(r"GLOBAL ([\w.]+) was not an allowed global", text)
             or re.search(r"unsupported GLOBAL ([\w.]+) whose module [\w.]+ is blocked", text)
             or re.search(r"but got <class '([\w.]+)'>", text))
    return match.group(1) if match else None


def _load_pickle(path: Path, allow_globals: tuple[str, ...]) -> object:
    """``torch.load(weights_only=True)`` allowing DeepSpeed's numpy types and ``allow_globals``; a
    refused global is named (and never suggested when it runs code). Other failures are left
    to :func:`..weight_files.read_weights` to word."""
    with torch.serialization.safe_globals(_allowed_pickle_globals(allow_globals)):
        try:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            name = _refused_global(error)
            if name is None:
                raise
            if _runs_code(name):
                raise InfDiTCheckpointError(
                    f"{path.name} was refused: it contains a pickled call of {_python3_name(name)}, which runs "
                    "commands or code on the machine that opens the file. A weights file never needs it; do not "
                    "open this file with any loader that runs pickled code.") from error
            raise InfDiTCheckpointError(
                f"{path.name} contains the pickled Python object {name}, which is not on the list of types "
                "this loader builds (tensors, and the numpy types DeepSpeed stores its RNG state with). "
                "Loading it would run code from the file. If you trust the file, convert it with "
                f"'cli/infdit_convert.py --allow-global {name} ...'.") from error


def read_state_dict(path: str | Path, allow_globals: tuple[str, ...] = (),
                    kind: FileKind = INFDIT_CHECKPOINT) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors of a weight file of ``kind`` and its metadata (safetensors only).

    DeepSpeed/SAT pickles keep the weights under ``'module'`` (also accepted: ``'state_dict'``
    or a bare state dict); everything else in them (optimizer and RNG states) is dropped.
    """
    return read_weights(path, kind, _reader(allow_globals, kind))


def _reader(allow_globals: tuple[str, ...], kind: FileKind) -> Loader:
    def read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
        if path.suffix.lower() in SAFETENSORS_SUFFIXES:
            return read_safetensors(path)
        return state_dict_of(_load_pickle(path, allow_globals), path, kind), {}
    return read
