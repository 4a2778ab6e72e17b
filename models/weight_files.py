"""Weight files: opening them, refusing broken ones in plain words, and writing them safely.

Every loader of the pack (CLEAR, GSPN, Inf-DiT and its CLIP tower) opens its files through
:func:`read_weights`, so a file that is empty, cut short, not in the format its name says, or
a model of another kind is refused the same way: the message names the file, says what is
wrong and what to do. :func:`key_sections` words missing, unexpected and misshapen keys the
same way for all of them, and every writer saves through :func:`write_atomically`, so an
interrupted save never leaves a half-written file behind.

The errors' types read well in ComfyUI's error dialog (:class:`ultrares.errors.NamedError`): it
says ``InfDiTCheckpointError`` rather than the pack's folder path.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import pickletools
import re
import struct
import zipfile
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import NamedError

SAFETENSORS = "safetensors"
TORCH = "torch"
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
MAX_HEADER_BYTES = 100_000_000
"""The largest header the safetensors format allows: a larger length is not a safetensors file."""

State = dict[str, torch.Tensor]
Metadata = dict[str, str]
Loader = Callable[[Path], tuple[State, Metadata]]
"""Reads a file that passed the checks: ``path -> (tensors, metadata)``."""


class WeightFileError(NamedError, ValueError):
    """A weight file the pack cannot use; the message names the file, what is wrong and what to do.

    Each loader raises its own subclass; the dialog shows their bare name (:mod:`ultrares.errors`).
    """


@dataclass(frozen=True)
class FileKind:
    """What one loader reads, for its checks and messages.

    ``name`` is what :func:`identify` calls such a file ("CLEAR weights"); ``accepts`` the
    identities a loader takes (its own name, and e.g. a whole Inf-DiT checkpoint where a CLIP
    tower is asked for); ``holds`` what its files hold, said to a user whose file has none of
    it; ``remedy`` the sentence that says where a good file comes from.
    """

    name: str
    error: type[WeightFileError]
    remedy: str
    holds: str
    formats: tuple[str, ...] = (SAFETENSORS, TORCH)
    also_accepts: tuple[str, ...] = ()

    @property
    def accepts(self) -> tuple[str, ...]:
        return (self.name, *self.also_accepts)


def name_first(keys: Sequence[str], shown: int = 5) -> str:
    """``"a, b, c (+12 more)"``: the first ``shown`` keys and the count of the rest, so a misfit file
    is identified without flooding the log with hundreds of names."""
    more = f" (+{len(keys) - shown} more)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def natural_order(key: str) -> list:
    """Sort key that puts ``blocks.2`` before ``blocks.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def size_text(size: int) -> str:
    """Bytes as a download page shows them: ``"2.1 GB"``, ``"640 KB"``, ``"12 bytes"``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} bytes"


# ---------------------------------------------------------------------------------------------
# What a file is


def _content(head: bytes) -> str | None:
    """What the first bytes of a file that is no weights format say it is, if anything."""
    text = head.lstrip().lower()
    if head.startswith(b"GGUF"):
        return "a GGUF file (quantised weights for the ComfyUI-GGUF loaders)"
    if text.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer (a few lines that stand for the file), not the file itself"
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        return "a web page (the download saved an error or sign-in page instead of the file)"
    return None


def _format_of(head: bytes, size: int) -> str | None:
    """``SAFETENSORS`` or ``TORCH`` from a file's first bytes, None when it is neither."""
    if head.startswith(b"PK\x03\x04") or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return TORCH  # torch.save's zip archive, or a pickle (the legacy torch.save format)
    if len(head) >= 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] <= MAX_HEADER_BYTES:
        return SAFETENSORS
    return None


FORMAT_NAMES = {SAFETENSORS: "a safetensors file", TORCH: "a PyTorch checkpoint (torch.save)"}
FORMAT_PLURALS = {SAFETENSORS: "safetensors files", TORCH: "PyTorch checkpoints"}


def _named_format(path: Path) -> str | None:
    """The format a file's name promises (loaders, ComfyUI's included, read files by their suffix)."""
    suffix = path.suffix.lower()
    return SAFETENSORS if suffix in SAFETENSORS_SUFFIXES else TORCH if suffix in TORCH_SUFFIXES else None


def _safetensors_header(path: Path, size: int, kind: FileKind) -> tuple[dict, int]:
    """The header of a safetensors file and the bytes its tensors need after it; refuses a file
    cut short inside or after its header, or whose header is no safetensors header."""
    with path.open("rb") as f:
        length = struct.unpack("<Q", f.read(8))[0]
        if 8 + length > size:
            raise kind.error(f"{path.name} is incomplete: it ends inside its header after {size_text(size)} (a "
                             f"download or copy that did not finish). {kind.remedy}")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise kind.error(f"{path.name} is damaged: its safetensors header is not readable. {kind.remedy}")
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets", ())) == 2]
    needed = 8 + length + max(ends, default=0)
    if needed > size:
        raise kind.error(f"{path.name} is incomplete: it has {size_text(size)} of the {size_text(needed)} its header "
                         f"lists (a download or copy that did not finish). {kind.remedy}")
    return header, needed


def file_format(path: str | os.PathLike, kind: FileKind) -> str:
    """The format of a weight file of ``kind`` (``SAFETENSORS`` or ``TORCH``), after refusing a
    file that is empty, cut short, in no weights format, or named for another format."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise kind.error(f"{path.name} is empty (0 bytes): the download or copy did not finish. {kind.remedy}")
    with path.open("rb") as f:
        head = f.read(64)
    found, named = _format_of(head, size), _named_format(path)
    if found is None:
        what = _content(head) or "in no weights format this pack reads"
        promised = named or (kind.formats[0] if len(kind.formats) == 1 else None)
        raise kind.error(f"{path.name} is not {FORMAT_NAMES.get(promised, 'a weights file')}: it is {what}. "
                         f"{kind.remedy}")
    if named is not None and found != named:
        suffix = ".safetensors" if found == SAFETENSORS else ".pt"
        raise kind.error(f"{path.name} is {FORMAT_NAMES[found]}, not {FORMAT_NAMES[named]} as its name says: "
                         f"rename it to end in {suffix}.")
    if found not in kind.formats:
        raise kind.error(f"{path.name} is {FORMAT_NAMES[found]}, not {kind.name} (read from "
                         f"{' or '.join(FORMAT_PLURALS[f] for f in kind.formats)} only). {kind.remedy}")
    if found == SAFETENSORS:
        _safetensors_header(path, size, kind)
    elif head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
        raise kind.error(f"{path.name} is incomplete: the end of its archive is missing after {size_text(size)} (a "
                         f"download or copy that did not finish). {kind.remedy}")
    return found


def header_keys(path: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], Metadata]:
    """Tensor shapes and metadata of a checked safetensors file, read from its header alone."""
    with Path(path).open("rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    metadata = header.pop("__metadata__", None) or {}
    return {key: tuple(entry["shape"]) for key, entry in header.items()}, metadata


def stored_keys(path: str | os.PathLike) -> frozenset[str] | None:
    """The tensor names a weight file holds, read without loading a tensor or running any of its
    code: a safetensors header, or the strings of a ``torch.save`` archive's pickle (read as
    opcodes, never unpickled; the names are among them). None when the file tells nothing that
    way (a legacy pickle, a broken or foreign file): decide by its name then."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(64)
        found = _format_of(head, size)
        if found == SAFETENSORS:
            keys, _ = header_keys(path)
            return frozenset(keys)
        if found == TORCH and head.startswith(b"PK\x03\x04"):
            with zipfile.ZipFile(path) as archive:
                (member,) = [name for name in archive.namelist() if name.endswith("/data.pkl") or name == "data.pkl"]
                return frozenset(arg for _, arg, _ in pickletools.genops(archive.read(member)) if isinstance(arg, str))
    except (OSError, ValueError, KeyError, struct.error, zipfile.BadZipFile):
        return None
    return None


# Other kinds of model files, to tell a user which file they chose: (pattern any key matches,
# what the file is, where it belongs). The first that matches wins; LoRAs go first, since they
# carry their model's key names.
_KINDS: tuple[tuple[re.Pattern[str], str, str], ...] = tuple((re.compile(pattern), what, where) for pattern, what, where in (
    (r"lora_unet_(double|single)_blocks|(^|\.)(double|single)_blocks\..*lora|transformer\..*lora_[AB]",
     "a FLUX LoRA", "load it with a LoRA loader (models/loras)"),
    (r"(^|\.)lora[._]|_lora\.|lora_(up|down|A|B)\b", "a LoRA", "load it with a LoRA loader (models/loras)"),
    (r"^(model\.diffusion_model\.)?double_blocks\.\d+\.img_attn|^(transformer\.)?single_transformer_blocks\.\d+\.proj_mlp",
     "a FLUX diffusion model", "it goes into models/diffusion_models"),
    (r"^model\.diffusion_model\.input_blocks\.", "an SD1.5/SDXL checkpoint", "it goes into models/checkpoints"),
    (r"^input_blocks\.0\.0\.weight$", "an SD1.5/SDXL UNet", "it goes into models/unet"),
    (r"^(first_stage_model\.)?(encoder\.down\.\d+\.block|decoder\.up\.\d+\.block)", "a VAE", "it goes into models/vae"),
    (r"^(.*\.)?text_model\.encoder\.layers\.|^encoder\.block\.\d+\.layer\.\d+\.SelfAttention",
     "a text encoder (CLIP or T5)", "it goes into models/text_encoders"),
    (r"^vision_model\.embeddings\.", "a CLIP vision model in ComfyUI's (Hugging Face) layout",
     "it is for ComfyUI's own CLIP Vision loader (models/clip_vision)"),
    (r"^(control_model\.)?input_hint_block\.|^controlnet_", "a ControlNet", "it goes into models/controlnet"),
    (r"^(model\.0\.weight|conv_first\.weight|body\.0\.)", "an image upscale model", "it goes into models/upscale_models"),
    (r"^(single_)?transformer_blocks\.\d+\.attn\.(to_[qkv]|to_out\.0|processor\.spatial_weight)", "CLEAR weights",
     "it goes into models/clear, for the CLEAR attention node"),
    (r"^(transformer\.layers\.\d+\.attention\.|mixins\.adaln_layer\.|blocks\.\d+\.qkv\.|lr_xattn\.)",
     "an Inf-DiT checkpoint", "it goes into models/infdit, for the Inf-DiT loader"),
    (r"^(visual\.)?conv1\.weight$", "an OpenCLIP image tower", "choose it as the Inf-DiT loader's clip_vision"),
))
_FORMAT_KINDS = {"ultrares.gspn": ("GSPN weights made by this pack", "use it with the GSPN Patch node"),
                 "ultrares.gspn.optimizer": ("the optimizer state of a GSPN distillation",
                                             "it stays beside its weights file, for resuming"),
                 "ultrares.clear.distilled": ("CLEAR weights", "it goes into models/clear, for the CLEAR attention node"),
                 "ultrares.clear.optimizer": ("the optimizer state of a CLEAR distillation",
                                              "it stays beside its weights file, for resuming")}


def identify(keys: Collection[str], metadata: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """``(what the file is, where it belongs)`` for a model file of a kind the pack knows, else None."""
    known = _FORMAT_KINDS.get((metadata or {}).get("format", ""))
    if known:
        return known
    for pattern, what, where in _KINDS:
        if any(pattern.search(key) for key in keys):
            return what, where
    return None


def refuse_kind(path: Path, kind: FileKind, keys: Collection[str], metadata: Mapping[str, str] | None) -> WeightFileError:
    """The error for a readable file that is not of ``kind``: what it is instead where that can be
    told (``"x.safetensors is a FLUX LoRA, not CLEAR weights: load it with a LoRA loader ..."``)."""
    found = identify(keys, metadata)
    if found is not None:
        what, where = found
        return kind.error(f"{path.name} is {what}, not {kind.name}: {where}. {kind.remedy}")
    first = f"its first keys are {name_first(sorted(keys, key=natural_order))}" if keys else "it holds no tensors"
    return kind.error(f"{path.name} is not {kind.name}: {kind.holds}, but {first}. {kind.remedy}")


def _check_kind(path: Path, kind: FileKind, keys: Collection[str], metadata: Mapping[str, str] | None) -> None:
    found = identify(keys, metadata)
    if found is None or found[0] not in kind.accepts:
        raise refuse_kind(path, kind, keys, metadata)


# ---------------------------------------------------------------------------------------------
# Reading


def read_safetensors(path: Path) -> tuple[State, Metadata]:
    """Every tensor and the metadata of a safetensors file, on the CPU."""
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})


def state_dict_of(data: object, path: Path, kind: FileKind) -> State:
    """The tensors of an unpickled checkpoint: the dict itself, or the one under ``'state_dict'``
    or ``'module'`` (DeepSpeed), without the non-tensor entries a trainer stores beside them."""
    for wrapper in ("state_dict", "module"):
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
            break
    if not isinstance(data, dict):
        raise kind.error(f"{path.name} holds a {type(data).__name__}, not a dict of tensors. {kind.remedy}")
    tensors = {key: value for key, value in data.items() if isinstance(value, torch.Tensor)}
    others = sorted(str(key) for key in data if key not in tensors)
    if others:
        raise kind.error(f"{path.name} holds entries that are not tensors in its state dict: {name_first(others, 8)}. "
                         f"{kind.remedy}")
    return tensors


def read_torch(path: Path, kind: FileKind) -> tuple[State, Metadata]:
    """The tensors of a ``torch.save`` file, loaded with ``weights_only=True`` (no pickled code runs)."""
    return state_dict_of(torch.load(path, map_location="cpu", weights_only=True), path, kind), {}


_TRUNCATED = ("failed finding central directory", "unexpected EOF", "pickle data was truncated", "Ran out of input",
              "incomplete metadata", "file not fully covered")


def unpickling_reason(error: BaseException) -> str:
    """What torch's safe unpickler objected to, without its advice to load the file unsafely."""
    text = str(error)
    if not isinstance(error, pickle.UnpicklingError) and "weights_only" not in text:
        return text.split("\n")[0]
    match = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    return match.group(1).strip() if match else "its pickle is not one the safe loader reads"


def refuse_unreadable(path: Path, kind: FileKind, fmt: str, error: Exception) -> WeightFileError:
    """The error for a file whose reader failed: cut short, or unreadable for the reason given."""
    if isinstance(error, EOFError) or any(sign in str(error) for sign in _TRUNCATED):
        return kind.error(f"{path.name} is incomplete: its data ends early (a download or copy that did not finish). "
                          f"{kind.remedy}")
    name = "torch checkpoint" if fmt == TORCH else "safetensors file"
    return kind.error(f"{path.name}: cannot read the file as a {name} ({unpickling_reason(error)}). {kind.remedy}")


def read_weights(path: str | os.PathLike, kind: FileKind, load: Loader | None = None) -> tuple[State, Metadata]:
    """The tensors and metadata of a weight file of ``kind``, after the checks of :func:`file_format`.

    A file that :func:`identify` does not take for one of ``kind.accepts`` is refused naming
    what it is instead; a safetensors file is asked from its header, before any tensor is read
    (a 20 GB model of the wrong kind is refused at once). ``load`` reads the file where
    the caller has a reader of its own (the host's, or one that allows certain pickled types);
    any other error it raises is worded by :func:`refuse_unreadable`.
    """
    path = Path(path)
    fmt = file_format(path, kind)
    if fmt == SAFETENSORS:
        _check_kind(path, kind, *header_keys(path))
    try:
        if load is not None:
            state, metadata = load(path)
        elif fmt == SAFETENSORS:
            state, metadata = read_safetensors(path)
        else:
            state, metadata = read_torch(path, kind)
    except WeightFileError:
        raise
    except Exception as error:
        raise refuse_unreadable(path, kind, fmt, error) from error
    metadata = dict(metadata or {})
    if fmt == TORCH:
        _check_kind(path, kind, state, metadata)
    return state, metadata


@contextlib.contextmanager
def naming(path: str | os.PathLike, kind: FileKind) -> Iterator[None]:
    """Errors of ``kind`` raised inside name the file: ``"<file>: <message>"`` when the message
    does not already start with it (checks deep in a loader need not know the file)."""
    name = Path(path).name
    try:
        yield
    except kind.error as error:
        if str(error).startswith(name):
            raise
        raise kind.error(f"{name}: {error}") from error


# ---------------------------------------------------------------------------------------------
# Keys and shapes


def key_sections(found: Mapping[str, Sequence[int]], expected: Mapping[str, Sequence[int] | None], what: str,
                 shown: int = 5, show: Callable[[str], str] = str) -> list[str]:
    """What keeps ``found`` from being ``expected``, one wording for every loader:
    ``"missing <what> keys: ..."``, ``"unexpected <what> keys: ..."`` and
    ``"<what> keys of another shape: k (2, 3) (expected (3, 3))"``, the first ``shown`` of each
    (in the order of ``expected``; unexpected keys in natural order). An expected shape of None
    takes any shape; ``show`` renders a key as the file names it (e.g. the released checkpoint's
    own names)."""
    missing = [key for key in expected if key not in found]
    unexpected = sorted(set(found) - set(expected), key=natural_order)
    wrong = [f"{show(key)} {tuple(found[key])} (expected {tuple(shape)})" for key, shape in expected.items()
             if key in found and shape is not None and tuple(found[key]) != tuple(shape)]
    return [f"{label}{what} keys{tail}: {name_first(keys, shown)}" for label, tail, keys in (
        ("missing ", "", [show(k) for k in missing]), ("unexpected ", "", [show(k) for k in unexpected]),
        ("", " of another shape", wrong)) if keys]


def refuse_keys(path: str | os.PathLike, kind: FileKind, sections: Sequence[str], fits: str) -> WeightFileError:
    """``"<file> does not fit <fits>: <sections>. <remedy>"``."""
    return kind.error(f"{Path(path).name} does not fit {fits}: {'; '.join(sections)}. {kind.remedy}")


# ---------------------------------------------------------------------------------------------
# Writing


@contextlib.contextmanager
def write_atomically(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` to write to; on success it is flushed to disk and
    renamed onto ``path`` in one step, on failure removed. A reader sees the old file or the
    new one, never a part of it (an interrupted save, a full disk, a crash)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        yield partial
        with partial.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` as a safetensors file through :func:`write_atomically`."""
    with write_atomically(path) as partial:
        save_file(dict(tensors), str(partial), metadata=dict(metadata) if metadata is not None else None)
