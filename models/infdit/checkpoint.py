"""Inf-DiT weight files: the released DeepSpeed/SAT pickle and the pack's safetensors.

The release is ``mp_rank_00_model_states.pt``: a DeepSpeed checkpoint whose ``['module']``
holds SwissArmyTransformer (SAT) names (``transformer.layers.{i}.attention.query_key_value``,
``mixins.adaln_layer.re_pos_embed`` ...) plus the frozen OpenCLIP tower under
``image_encoder.model.visual``. :func:`convert_checkpoint` rewrites it once into a
safetensors file with this pack's names; :func:`load_infdit` accepts either, infers the
sizes from the shapes, checks every tensor against them and refuses missing or unexpected
keys by name.

The 2D RoPE tables are weights like the others. The release stores them as bf16 buffers
(``[1024, 1024, 80]``) and the reference's attention uses those stored values in every
compute dtype, so the network keeps them (by their diagonal, see :mod:`.attention`) instead of
recomputing them, casts them with the other weights, and a converted file carries them as
``rope.cos`` / ``rope.sin``. Their period (positions per axis; ``8 x image_size / patch`` in
the reference, which fixes ``image_size`` at 512) is the one size no other tensor records: it
is the table's size in a released file, and the ``rope_period`` metadata of a converted file,
which its tables must fit.

Files (the checkpoint and a separate CLIP tower) are opened through :mod:`.files` (the
pickle read safely) and :mod:`..weight_files`: an empty, incomplete or misnamed file and a
model of another kind are refused naming the file, and every refusal raised while a file is
loaded names it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..weight_files import FileKind, key_sections, name_first, naming, natural_order, save_safetensors
from .clip_vision import ClipVisionConfig, ClipVisionEncoder
from .attention import table_diagonal
from .config import InfDiTConfig
from .files import CLIP_PREFIX, CLIP_TOWER, INFDIT_CHECKPOINT, InfDiTCheckpointError, read_state_dict
from .network import InfDiT, Operations

PACK_FORMAT = "ultrares-infdit"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
"""The precisions weights are loaded or converted in, by the names the loader node and the converter offer."""
SAT_CLIP_PREFIX = "image_encoder.model.visual."
SAT_BLOCK_BIAS = "mixins.adaln_layer.re_pos_embed"
ROPE_TABLES = {"rope.cos": "mixins.adaln_layer.rope.freqs_cos", "rope.sin": "mixins.adaln_layer.rope.freqs_sin"}
"""Pack name (a table's diagonal, ``[period, head_dim]``) -> SAT name (the whole table)."""
DEFAULT_ROPE_PERIOD = 1024

# (SAT name, pack name); {i} is a layer index, {p} "weight" or "bias".
KEY_MAP: tuple[tuple[str, str], ...] = (
    ("mixins.patch_embed.proj.{p}", "patch_embed.{p}"),
    ("time_embed.mlp.0.{p}", "time_embed.fc1.{p}"),
    ("time_embed.mlp.2.{p}", "time_embed.fc2.{p}"),
    ("cond_embed.map_vector.0.{p}", "vector_embed.fc1.{p}"),
    ("cond_embed.map_vector.2.{p}", "vector_embed.fc2.{p}"),
    ("transformer.layers.{i}.attention.query_key_value.{p}", "blocks.{i}.qkv.{p}"),
    ("transformer.layers.{i}.attention.dense.{p}", "blocks.{i}.attn_out.{p}"),
    ("transformer.layers.{i}.mlp.dense_h_to_4h.{p}", "blocks.{i}.fc1.{p}"),
    ("transformer.layers.{i}.mlp.dense_4h_to_h.{p}", "blocks.{i}.fc2.{p}"),
    ("mixins.adaln_layer.adaLN_modulations.{i}.1.{p}", "blocks.{i}.ada.{p}"),
    ("mixins.adaln_layer.q_layer_norm.{i}.{p}", "blocks.{i}.qk_norm.{p}"),
    ("mixins.adaln_layer.proj_lr.{p}", "lr_xattn.proj_lr.{p}"),
    ("mixins.adaln_layer.cross_attention.query.{p}", "lr_xattn.query.{p}"),
    ("mixins.adaln_layer.cross_attention.key_value.{p}", "lr_xattn.key_value.{p}"),
    ("mixins.adaln_layer.cross_attention.dense.{p}", "lr_xattn.dense.{p}"),
    ("mixins.adaln_layer.post_cross_attention_layernorm.{p}", "lr_xattn.post_norm.{p}"),
    ("mixins.adaln_layer.cross_q_ln.{p}", "lr_xattn.q_norm.{p}"),
    ("mixins.adaln_layer.cross_k_ln.{p}", "lr_xattn.k_norm.{p}"),
    ("mixins.adaln_layer.lr_query_position_embedding", "lr_xattn.query_pos"),
    ("mixins.adaln_layer.lr_key_position_embedding", "lr_xattn.key_pos"),
    ("mixins.final_layer.adaLN_modulation.1.{p}", "final.ada.{p}"),
    ("mixins.final_layer.linear.{p}", "final.linear.{p}"),
)

# SAT entries the released model never reads: the key LayerNorms (the model normalises keys
# with the query LayerNorm), SAT's unused position embedding and the leftovers of the deleted
# CLIP text tower.
SAT_IGNORED: tuple[str, ...] = (
    r"mixins\.adaln_layer\.k_layer_norm\.\d+\.(weight|bias)",
    r"transformer\.position_embeddings\.weight",
    r"image_encoder\.model\.(token_embedding\.weight|positional_embedding|text_projection|logit_scale|attn_mask)",
)

# OpenCLIP checkpoints: the image tower under "visual.", the text tower around it.
OPENCLIP_TEXT = r"(token_embedding\.weight|positional_embedding|text_projection|logit_scale|attn_mask|ln_final\..*|transformer\..*)"


# ---------------------------------------------------------------------------------------------
# Key names


def _template_regex(template: str) -> re.Pattern[str]:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(pattern + r"\Z")


_SAT_TO_PACK = [(_template_regex(sat), pack) for sat, pack in KEY_MAP]
_PACK_TO_SAT = [(_template_regex(pack), sat) for sat, pack in KEY_MAP]
_SAT_IGNORED = [re.compile(p + r"\Z") for p in SAT_IGNORED]


def _rename(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    for regex, template in rules:
        if match := regex.match(key):
            return template.format(**match.groupdict())
    return None


@dataclass
class SplitCheckpoint:
    """A weight file's tensors sorted by purpose, in the pack's names."""

    dit: dict[str, torch.Tensor]
    clip: dict[str, torch.Tensor]
    rope_period: int
    sat: bool = False
    """Whether the file used the released SAT names (error messages then use them too)."""


def _check_rope_pair(state: dict[str, torch.Tensor], names: tuple[str, str]) -> None:
    """cos and sin tables hold floating-point values, in one shape and one dtype."""
    tables = [(name, state[name]) for name in names if name in state]
    for name, table in tables:
        if not table.is_floating_point():
            raise InfDiTCheckpointError(f"the RoPE table {name} holds {table.dtype} values, not floating-point ones")
    if len(tables) == 2 and (tables[0][1].shape != tables[1][1].shape or tables[0][1].dtype != tables[1][1].dtype):
        raise InfDiTCheckpointError("the RoPE tables do not match each other: " + ", ".join(
            f"{name} {tuple(table.shape)} {str(table.dtype).removeprefix('torch.')}" for name, table in tables))


def _sat_rope_diagonal(key: str, table: torch.Tensor) -> torch.Tensor:
    try:
        return table_diagonal(table)
    except ValueError as error:
        raise InfDiTCheckpointError(f"the RoPE table {key} {tuple(table.shape)} cannot be used: {error}") from error


def _period(dit: dict[str, torch.Tensor]) -> int:
    """Positions per axis of the tables present (else the release's; the missing keys are then named)."""
    tables = [dit[key] for key in ROPE_TABLES if key in dit]
    return tables[0].shape[0] if tables else DEFAULT_ROPE_PERIOD


def split_sat(state: dict[str, torch.Tensor]) -> SplitCheckpoint:
    """SAT names (the released ``['module']``) -> pack names; refuses keys it does not know."""
    _check_rope_pair(state, tuple(ROPE_TABLES.values()))
    rope_keys = {sat: pack for pack, sat in ROPE_TABLES.items()}
    dit: dict[str, torch.Tensor] = {}
    clip: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        if key.startswith(SAT_CLIP_PREFIX):
            clip[key[len(SAT_CLIP_PREFIX):]] = value
        elif key == SAT_BLOCK_BIAS:
            for layer, bias in enumerate(value.unbind(0)):
                dit[f"blocks.{layer}.block_bias"] = bias
        elif key in rope_keys:
            dit[rope_keys[key]] = _sat_rope_diagonal(key, value)
        elif (name := _rename(key, _SAT_TO_PACK)) is not None:
            dit[name] = value
        elif not any(regex.match(key) for regex in _SAT_IGNORED):
            unknown.append(key)
    if unknown:
        raise InfDiTCheckpointError(f"unexpected Inf-DiT keys: {name_first(sorted(unknown, key=natural_order), 8)}. "
                                    f"{INFDIT_CHECKPOINT.remedy}")
    return SplitCheckpoint(dit, clip, _period(dit), sat=True)


def sat_name(key: str) -> str:
    """The released (SAT) name of a pack key, for messages about SAT files."""
    if match := re.fullmatch(r"blocks\.(\d+)\.block_bias", key):
        return f"{SAT_BLOCK_BIAS}[{match.group(1)}]"
    return ROPE_TABLES.get(key) or _rename(key, _PACK_TO_SAT) or key


def split_checkpoint(state: dict[str, torch.Tensor], metadata: dict) -> SplitCheckpoint:
    """Tensors in either naming (the released SAT names, or this pack's) -> :class:`SplitCheckpoint`."""
    if any(key.startswith(("transformer.layers.", "mixins.")) for key in state):
        return split_sat(state)
    if not any(key in state for key in ROPE_TABLES):
        raise InfDiTCheckpointError(
            "this converted file has no RoPE tables (rope.cos, rope.sin): an earlier version of the converter "
            "dropped them, but the release's own (bf16) tables are what the model computes with. Convert the "
            "released checkpoint again.")
    _check_rope_pair(state, tuple(ROPE_TABLES))
    dit = {key: value for key, value in state.items() if not key.startswith(CLIP_PREFIX)}
    clip = {key[len(CLIP_PREFIX):]: value for key, value in state.items() if key.startswith(CLIP_PREFIX)}
    period = metadata.get("rope_period")
    if period is not None and not period.isdigit():
        raise InfDiTCheckpointError(f"the file's metadata gives rope_period {period!r}, not a whole number")
    return SplitCheckpoint(dit, clip, _period(dit) if period is None else int(period))


def clip_state_from_file(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A separate OpenCLIP file (``visual.*`` with its text tower, bare tower keys, or the SAT
    or pack prefixes) -> the image tower's tensors in OpenCLIP naming."""
    for prefix in (SAT_CLIP_PREFIX, CLIP_PREFIX):
        if tower := {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}:
            return tower
    for prefix in ("visual.",):
        if tower := {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}:
            rest = [key for key in state if not key.startswith(prefix)
                    and not re.match(OPENCLIP_TEXT + r"\Z", key.removeprefix("image_encoder.model."))]
            if rest:
                raise InfDiTCheckpointError(f"unexpected CLIP image tower keys: "
                                            f"{name_first(sorted(rest, key=natural_order), 8)}. {CLIP_TOWER.remedy}")
            return tower
    if "conv1.weight" in state:
        return dict(state)
    raise InfDiTCheckpointError("it holds no OpenCLIP ViT image tower: no 'visual.conv1.weight' or 'conv1.weight' "
                                f"(first keys: {name_first(sorted(state, key=natural_order))}). {CLIP_TOWER.remedy}")


# ---------------------------------------------------------------------------------------------
# Configuration from shapes, and strict verification


def _shape(state: dict[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise InfDiTCheckpointError(f"missing key {key!r}: cannot infer the model size")
    return tuple(state[key].shape)


def infer_config(dit: dict[str, torch.Tensor], rope_period: int = DEFAULT_ROPE_PERIOD) -> InfDiTConfig:
    """Sizes from the shapes (layers, width, heads, patch, block ...), so any size loads."""
    hidden, in_channels, patch, _ = _shape(dit, "patch_embed.weight")
    layer_ids = {int(m.group(1)) for key in dit if (m := re.match(r"blocks\.(\d+)\.", key))}
    if layer_ids != set(range(len(layer_ids))) or not layer_ids:
        raise InfDiTCheckpointError(f"layers are not numbered 0..n-1: found {sorted(layer_ids)}")
    head_dim = _shape(dit, "blocks.0.qk_norm.weight")[0]
    block_tokens = _shape(dit, "lr_xattn.query_pos")[1]
    window_tokens = _shape(dit, "lr_xattn.key_pos")[1]
    block, window = math.isqrt(block_tokens), math.isqrt(window_tokens)
    if block * block != block_tokens or window * window != window_tokens or window % 3:
        raise InfDiTCheckpointError(f"LR position embeddings {block_tokens} / {window_tokens} tokens are not square blocks")
    try:
        return InfDiTConfig(
            hidden=hidden, layers=len(layer_ids), heads=hidden // head_dim, patch=patch, block=block,
            lr_patch=_shape(dit, "lr_xattn.proj_lr.weight")[-1], lr_block=window // 3,
            time_channels=_shape(dit, "time_embed.fc1.weight")[1], vector_dim=_shape(dit, "vector_embed.fc1.weight")[1],
            in_channels=in_channels, out_channels=_shape(dit, "final.linear.weight")[0] // (patch * patch),
            mlp_ratio=_shape(dit, "blocks.0.fc1.weight")[0] // hidden, rope_period=rope_period)
    except ValueError as error:
        raise InfDiTCheckpointError(f"inconsistent sizes in the checkpoint: {error}") from error


def infer_clip_config(clip: dict[str, torch.Tensor]) -> ClipVisionConfig:
    width, _, patch, _ = _shape(clip, "conv1.weight")
    tokens = _shape(clip, "positional_embedding")[0] - 1
    side = math.isqrt(tokens)
    layers = len({int(m.group(1)) for key in clip if (m := re.match(r"transformer\.resblocks\.(\d+)\.", key))})
    return ClipVisionConfig(width=width, layers=layers, patch=patch, image_size=side * patch,
                            embed_dim=_shape(clip, "proj")[1], mlp_width=_shape(clip, "transformer.resblocks.0.mlp.c_fc.weight")[0])


def _check_rope_tables(parts: SplitCheckpoint, cfg: InfDiTConfig) -> None:
    """The tables fit the configuration (as ``load_state_dict`` would check them), with a period
    the reference can build: ``8 x image_size / patch`` positions per axis."""
    name = sat_name if parts.sat else str
    shown = (lambda shape: (shape[0], *shape)) if parts.sat else tuple
    expected = (cfg.rope_period, cfg.head_dim)
    for key in ROPE_TABLES:
        if key in parts.dit and tuple(parts.dit[key].shape) != expected:
            source = "" if parts.sat else f"; rope_period {cfg.rope_period} in the file's metadata"
            raise InfDiTCheckpointError(f"Inf-DiT keys of another shape: {name(key)} {shown(parts.dit[key].shape)} "
                                        f"(expected {shown(expected)}{source})")
    if cfg.rope_period % 8:
        raise InfDiTCheckpointError(
            f"{name('rope.cos')} has {cfg.rope_period} RoPE positions per axis, but the reference builds its tables "
            "with 8 x image_size / patch of them (1024 for the release: 512-px crops, 4-px patches), a multiple of "
            "8: no Inf-DiT configuration has this table")


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, kind: FileKind,
                source_name: Callable[[str], str] = str) -> None:
    """Copy ``state`` into ``module``; every key must exist on both sides with the same shape.

    ``source_name`` renders a key as the file names it (e.g. the SAT name), for the messages.
    """
    sections = key_sections({key: value.shape for key, value in state.items()},
                            {key: value.shape for key, value in module.state_dict().items()}, what, 8, source_name)
    if sections:
        raise kind.error(f"{'; '.join(sections)}. {kind.remedy}")
    module.load_state_dict(state, assign=True)


# ---------------------------------------------------------------------------------------------
# Public entry points


@dataclass
class InfDiTWeights:
    """A loaded upsampler: the DiT and (when available) its CLIP image tower."""

    net: InfDiT
    clip: ClipVisionEncoder | None


ALIGNMENT = 64
"""Bytes PyTorch aligns its CPU allocations to."""


def _in_dtype(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``value`` in ``dtype``, in aligned memory: safetensors hands out views into the file at any
    offset, and CPU kernels round differently on unaligned weights (a converted fp32 file would
    otherwise compute other last bits than the file it came from)."""
    return value.to(dtype, copy=value.data_ptr() % ALIGNMENT != 0)


def _build(cls, cfg, state: dict[str, torch.Tensor], what: str, kind: FileKind, dtype: torch.dtype,
           operations: Operations, source_name: Callable[[str], str] = str) -> torch.nn.Module:
    """``cls(cfg, operations)`` holding ``state`` in ``dtype``: every tensor is cast, the RoPE tables
    too, as the reference casts its buffers with the model before loading the stored values into them."""
    with torch.device("meta"):
        module = cls(cfg, operations)
    load_strict(module, {key: _in_dtype(value, dtype) for key, value in state.items()}, what, kind, source_name)
    return module.eval().requires_grad_(False)


def load_clip(state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
              operations: Operations = torch.nn) -> ClipVisionEncoder:
    """An OpenCLIP image tower from its tensors (sizes read from their shapes)."""
    return _build(ClipVisionEncoder, infer_clip_config(state), state, "CLIP image tower", CLIP_TOWER, dtype, operations)


def load_infdit(path: str | Path, dtype: torch.dtype = torch.float32, clip_path: str | Path | None = None,
                allow_globals: tuple[str, ...] = (), operations: Operations = torch.nn) -> InfDiTWeights:
    """Load an Inf-DiT file (released pickle or converted safetensors) on the CPU.

    The CLIP tower comes from ``clip_path`` when given, else from the checkpoint if it has
    one; otherwise :attr:`InfDiTWeights.clip` is ``None``. Both networks are built from
    ``operations`` (e.g. a ``comfy.ops`` class).
    """
    with naming(path, INFDIT_CHECKPOINT):
        state, metadata = read_state_dict(path, allow_globals)
        parts = split_checkpoint(state, metadata)
        cfg = infer_config(parts.dit, parts.rope_period)
        _check_rope_tables(parts, cfg)
        net = _build(InfDiT, cfg, parts.dit, "Inf-DiT", INFDIT_CHECKPOINT, dtype, operations,
                     sat_name if parts.sat else str)
        clip = load_clip(parts.clip, dtype, operations) if parts.clip and clip_path is None else None
    if clip_path is not None:
        with naming(clip_path, CLIP_TOWER):
            clip = load_clip(clip_state_from_file(read_state_dict(clip_path, kind=CLIP_TOWER)[0]), dtype,
                             operations)
    return InfDiTWeights(net, clip)




@dataclass(frozen=True)
class WeightSource:
    """Where a process finds the weights: a weight file (and CLIP file) loaded in ``dtype``, or
    the built-in tiny model. Plain data, so that processes a run starts (the ranks of a
    distributed upscale) each load the same weights themselves."""

    path: str | None = None
    clip_path: str | None = None
    dtype: str = "fp32"
    """A key of :data:`DTYPES`."""
    tiny_seed: int | None = None
    """Instead of a file: :func:`.tiny.tiny_weights` with this seed."""

    def __post_init__(self) -> None:
        if (self.path is None) == (self.tiny_seed is None):
            raise ValueError("a weight source names either a file or a tiny-model seed")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {sorted(DTYPES)}")

    def load(self) -> InfDiTWeights:
        """The weights, on the CPU."""
        if self.tiny_seed is not None:
            from .tiny import tiny_weights

            return tiny_weights(self.tiny_seed, dtype=DTYPES[self.dtype])
        return load_infdit(self.path, DTYPES[self.dtype], self.clip_path)


def convert_checkpoint(source: str | Path, target: str | Path, dtype: torch.dtype = torch.bfloat16,
                       clip_path: str | Path | None = None, allow_globals: tuple[str, ...] = ()) -> InfDiTConfig:
    """Rewrite a released checkpoint as a safetensors file in the pack's names (verified first).

    The file keeps the checkpoint's RoPE tables (their diagonals), so it computes what the
    source computes; bf16 or fp32 hold the release's bf16 values exactly.
    """
    weights = load_infdit(source, dtype, clip_path, allow_globals)
    tensors = {key: value.contiguous() for key, value in weights.net.state_dict().items()}
    if weights.clip is not None:
        tensors.update({CLIP_PREFIX + key: value.contiguous() for key, value in weights.clip.state_dict().items()})
    save_safetensors(tensors, target, {"format": PACK_FORMAT, "rope_period": str(weights.net.cfg.rope_period)})
    return weights.net.cfg
