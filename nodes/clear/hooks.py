"""The hooks the CLEAR node puts on a clone of a Flux model (no ComfyUI module is modified).

- Weights: the file's fine-tuned projections become ModelPatcher "set" weight patches placed
  in front of the clone's other patches, so LoRAs on the same tensors still add on top
  whatever the node order, and the unpatched model stays the original.
- Token grid: an ``APPLY_MODEL`` wrapper reads the latent (and Kontext reference latents)
  and hands the layout to the attention calls of that forward pass.
- Attention: an ``optimized_attention_override`` runs CLEAR on the model's joint
  ``[text | image | reference]`` calls and sends every other call (and everything while the
  image is small) to the previous override or ComfyUI's own attention. Nodes applied later may
  take the override slot (newer ComfyUI's attention backend and sparse attention nodes; the
  sparse one takes it back at every step), so the ``APPLY_MODEL`` wrapper puts CLEAR back on
  top for each call it handles, chaining to whatever it displaced, and says so once.
- What the user hears (:class:`ClearNotes`): one log line the first time CLEAR runs at an image
  size, and one when it steps aside (an image at or below ``min_image_tokens``, a window that
  covers the whole image, an attention call with a mask or of another shape).
- Block identity (per-layer ``spatial_weight``): newer ComfyUI puts ``block_type`` /
  ``block_index`` in ``transformer_options``; where it does not, ``patches_replace["dit"]``
  entries (wrapping any that were there) tag each block's options.
"""

from __future__ import annotations

import collections
import logging
import math

import comfy.ldm.flux.model
import comfy.model_patcher
import comfy.patcher_extension
import comfy.utils
import folder_paths
import torch

from ...models.clear import (Block, ClearAttention, ClearPattern, ClearWeights, StripeLayout, TokenLayout,
                            ntk_theta, plan_weights, read_clear_file)
from .override_slot import OVERRIDE_KEY, describe_override
from ..runtime import check_interrupt, progress_callback

WRAPPER_KEY = "ultrares_clear"
LAYOUT_KEY = "ultrares_clear_layout"
BLOCK_KEY = "ultrares_clear_block"
THETA_ATTRIBUTE = "diffusion_model.pe_embedder.theta"
TOKEN_PX = 16
"""Image pixels per FLUX token side (VAE 8x, patch 2x): what turns a token grid back into a size."""
# FLUX.1's block layout as ``FluxParams`` of newer ComfyUI spells it (fields absent on older hosts
# take these values): per-block modulation, GELU MLPs, biased projections, no text norm.
FLUX1_LAYOUT = {"global_modulation": False, "mlp_silu_act": False, "yak_mlp": False, "txt_norm": False,
                "ops_bias": True, "qkv_bias": True}

log = logging.getLogger(__name__)


def flux1_layout_differences(model: comfy.model_patcher.ModelPatcher,
                             network: comfy.ldm.flux.model.Flux) -> list[str]:
    """How a Flux-class network differs from FLUX.1's layout (Flux.2, Chroma, ... share the class)."""
    params = network.params
    found = [f"{name}={getattr(params, name)!r}" for name, expected in FLUX1_LAYOUT.items()
             if getattr(params, name, expected) != expected]
    if getattr(params, "txt_ids_dims", None):
        found.append(f"txt_ids_dims={list(params.txt_ids_dims)}")
    if len(params.axes_dim) != 3:
        found.append(f"{len(params.axes_dim)} RoPE axes")
    image_model = model.model.model_config.unet_config.get("image_model", "flux")
    if image_model != "flux":
        found.insert(0, f"image_model {image_model!r}")
    return found


def flux_module(model: comfy.model_patcher.ModelPatcher) -> comfy.ldm.flux.model.Flux:
    """The model's Flux network, or a clear error for any other model, Flux-class variants with
    another block layout included (CLEAR's weights and window were made for FLUX.1)."""
    network = model.get_model_object("diffusion_model")
    family = type(model.model.model_config).__name__
    if not isinstance(network, comfy.ldm.flux.model.Flux):
        raise ValueError(f"CLEAR patches FLUX models only; this model is {family} ({type(network).__name__})")
    differences = flux1_layout_differences(model, network)
    if differences:
        raise ValueError(f"CLEAR supports FLUX.1's block layout only (the one its weights were fine-tuned on); this "
                         f"{family} model has another ({', '.join(differences)}). Flux-class variants such as "
                         "Flux.2 and Chroma are not supported yet.")
    return network


def load_clear_file(model: comfy.model_patcher.ModelPatcher, filename: str) -> tuple[ClearWeights, dict]:
    """Read a file from ``models/clear`` and check it against ``model``; returns the weights and
    the file's metadata."""
    network = flux_module(model)
    path = folder_paths.get_full_path_or_raise("clear", filename)
    state_dict, metadata = read_clear_file(path, load=_host_reader)
    depth, depth_single = len(network.double_blocks), len(network.single_blocks)
    key_map = comfy.utils.flux_to_diffusers(
        {"depth": depth, "depth_single_blocks": depth_single, "hidden_size": network.hidden_size},
        output_prefix="diffusion_model.")
    shapes = {key: tuple(value.shape) for key, value in model.model.state_dict().items()}
    weights = plan_weights(state_dict, key_map, shapes, depth, depth_single, filename,
                           on_progress=progress_callback(len(state_dict)), check_interrupt=check_interrupt)
    return weights, metadata


def _host_reader(path) -> tuple[dict, dict]:
    """ComfyUI's own file reader (on newer hosts it memory-maps safetensors for Dynamic VRAM)."""
    state_dict, metadata = comfy.utils.load_torch_file(str(path), safe_load=True, return_metadata=True)
    return state_dict, metadata or {}


def add_weights_first(model: comfy.model_patcher.ModelPatcher, weights: ClearWeights) -> None:
    """Add the file's tensors as "set" patches and move them in front of the patches already
    on those tensors (a LoRA loaded before this node then still applies on top)."""
    patches = {(p.target, p.offset) if p.offset else p.target: ("set", (p.tensor,)) for p in weights.patches}
    added = model.add_patches(patches, strength_patch=1.0)
    if len(added) != len(patches):
        absent = sorted({p.target for p in weights.patches} - {k if isinstance(k, str) else k[0] for k in added})
        raise ValueError(f"the model has no parameter(s) {absent[:5]} for the CLEAR weights")
    for target, count in collections.Counter(p.target for p in weights.patches).items():
        entries = model.patches[target]
        model.patches[target] = entries[-count:] + entries[:-count]


def token_layout(x: torch.Tensor, patch_size: int, ref_latents: list | None) -> TokenLayout:
    """Image token grid of a ``[B, C, H, W]`` latent and the Kontext reference tokens after it
    (Flux pads every latent to the patch size before cutting tokens)."""
    grid = (math.ceil(x.shape[-2] / patch_size), math.ceil(x.shape[-1] / patch_size))
    n_ref = sum(math.ceil(r.shape[-2] / patch_size) * math.ceil(r.shape[-1] / patch_size) for r in ref_latents or [])
    return TokenLayout(grid, n_ref)


def size_text(grid: tuple[int, int]) -> str:
    """A token grid as the image size a user set: ``"2048×2048"`` (width first)."""
    return f"{grid[1] * TOKEN_PX}×{grid[0] * TOKEN_PX}"


class ClearNotes:
    """The log lines of one CLEAR patch, each said once: where CLEAR runs and where it steps aside."""

    def __init__(self, attention: ClearAttention, ntk_factor: float = 1.0, min_image_tokens: int = 0):
        self.attention, self.ntk_factor, self.min_image_tokens = attention, ntk_factor, min_image_tokens
        self.said: set = set()

    def once(self, key, message: str, *args) -> None:
        if key not in self.said:
            self.said.add(key)
            log.info(message, *args)

    def recipe(self) -> str:
        """What CLEAR does to the attention, in a few words."""
        pattern, parts = self.attention.pattern, []
        parts.append(f"each image token sees the tokens within {pattern.radius} tokens ({pattern.radius * TOKEN_PX} px)")
        if pattern.down_factor > 1:
            parts.append(f"plus a {pattern.down_factor}×{pattern.down_factor}-token summary of the whole image")
        if self.ntk_factor != 1.0:
            parts.append(f"NTK ×{self.ntk_factor:g}")
        if self.attention.proportional:
            parts.append("proportional attention")
        return ", ".join(parts)

    def active(self, layout: TokenLayout) -> None:
        self.once(("active", layout.grid), "CLEAR: active at %s (%d image tokens): %s", size_text(layout.grid),
                  layout.n_img, self.recipe())

    def small(self, layout: TokenLayout) -> None:
        self.once(("small", layout.grid), "CLEAR: steps aside at %s: %d image tokens, not above the %d set in 'Use "
                  "CLEAR above'; the model's own attention runs (CLEAR's weights%s still apply)",
                  size_text(layout.grid), layout.n_img, self.min_image_tokens,
                  f" and NTK ×{self.ntk_factor:g}" if self.ntk_factor != 1.0 else "")

    def declined(self, reason: str) -> None:
        self.once(("declined", reason), "CLEAR: steps aside for %s: the model's own attention runs for it", reason)


class LayoutWrapper:
    """``APPLY_MODEL`` wrapper: when the image has more than ``min_image_tokens`` tokens, puts the
    call's token layout into (a copy of) the transformer options and CLEAR's override on top of
    whichever override a later node installed there."""

    def __init__(self, attention: ClearAttention, patch_size: int, min_image_tokens: int,
                 notes: ClearNotes | None = None):
        self.attention = attention
        self.patch_size = patch_size
        self.min_image_tokens = min_image_tokens
        self.notes = notes if notes is not None else ClearNotes(attention, min_image_tokens=min_image_tokens)
        self.displaced: set[str] = set()

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                 **kwargs):
        options = dict(transformer_options or {})
        layout = token_layout(x, self.patch_size, kwargs.get("ref_latents"))
        if layout.n_img > self.min_image_tokens:
            options[LAYOUT_KEY] = layout
            self._put_on_top(options)
            if not self._log_dense_grid(layout.grid):
                self.notes.active(layout)
        else:
            self.notes.small(layout)
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)

    def _put_on_top(self, options: dict) -> None:
        current = options.get(OVERRIDE_KEY)
        if isinstance(current, ClearOverride) and current.attention is self.attention:
            return
        options[OVERRIDE_KEY] = ClearOverride(self.attention, current, self.notes)
        who = describe_override(current)
        if who not in self.displaced:
            self.displaced.add(who)
            log.info("CLEAR: the attention override slot held %s, put there by a node applied after the CLEAR "
                     "node; CLEAR runs on top of it again for the image attention it handles and hands it every "
                     "other call", who)

    def _log_dense_grid(self, grid: tuple[int, int]) -> bool:
        """Say once when the window covers the whole image; True when it does."""
        pattern = self.attention.pattern
        if not pattern.covers(grid):
            return False
        extras = [name for name, on in (("the down-sampled keys", pattern.down_factor > 1),
                                        ("the proportional softmax scale", self.attention.proportional)) if on]
        rest = (f"so only {' and '.join(extras)} differ from dense attention" if extras
                else "so CLEAR steps aside and the model's own attention runs here (exact)")
        self.notes.once(("covers", grid), "CLEAR: the window radius %d covers the whole %dx%d token grid (%s), %s",
                        pattern.radius, *grid, size_text(grid), rest)
        return True


def calling_block(options: dict) -> Block | None:
    """The block an attention call comes from: this pack's tag, else the host's own keys."""
    block = options.get(BLOCK_KEY)
    if block is None and options.get("block_type") in ("double", "single") and "block_index" in options:
        block = (options["block_type"], int(options["block_index"]))
    return block


class ClearOverride:
    """``optimized_attention_override``: CLEAR on the joint Flux calls, the previous override
    (or ComfyUI's attention) on everything else.

    ``memory_efficient`` is the tag newer ComfyUI reads (``call_memory_required`` in
    ``comfy/model_patcher.py``) to size sampling batches with its flash-attention estimate; an
    untagged override gets the conservative one (7.5x larger in bf16). CLEAR's windowed calls
    hold no ``L x L`` score matrix.
    """

    memory_efficient = True

    def __init__(self, attention: ClearAttention, previous=None, notes: ClearNotes | None = None):
        self.attention = attention
        self.previous = previous
        self.notes = notes

    def __deepcopy__(self, memo: dict) -> ClearOverride:
        # ModelPatcher.clone deep-copies model_options but not its wrappers: a copy here would hold
        # a copy of the weights the wrapper no longer recognises as its own (it would stack CLEAR on
        # top of its copy and say another node displaced it). Clones share it, as they share weights.
        return self

    def dense(self, func, *args, **kwargs):
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def decline(self, layout, func, *args, **kwargs):
        """A call CLEAR does not take goes on to the attention below, except on one device's
        stripe of the image (:mod:`.devices`), where that attention would see the stripe
        alone: such a call is an error, never a silently different result."""
        if isinstance(layout, StripeLayout):
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
            raise RuntimeError(f"an attention call CLEAR cannot take (shapes {shapes}, mask "
                               f"{'set' if kwargs.get('mask') is not None else 'none'}) came during a CLEAR run on "
                               "several devices; only CLEAR's own joint text + image attention can be split")
        if self.notes is not None and layout is not None:
            self.notes.declined("an attention call with a mask" if kwargs.get("mask") is not None
                                else "an attention call that is not FLUX's joint text + image attention")
        return self.dense(func, *args, **kwargs)

    def __call__(self, func, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        layout = options.get(LAYOUT_KEY)
        if layout is None or len(args) != 4 or not kwargs.get("skip_reshape") or kwargs.get("mask") is not None:
            return self.decline(layout, func, *args, **kwargs)
        q, k, v, heads = args
        joint = (q.ndim == 4 and q.shape == k.shape == v.shape and q.shape[1] == heads
                 and layout.text_tokens(q.shape[2]) is not None)
        if not joint:
            return self.decline(layout, func, *args, **kwargs)
        if isinstance(layout, TokenLayout) and self.attention.is_plain_attention(layout):
            return self.dense(func, *args, **kwargs)  # the window covers the image (said by the wrapper)
        out = self.attention(q, k, v, layout, calling_block(options))
        if kwargs.get("skip_output_reshape"):
            return out
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


class BlockTag:
    """``patches_replace["dit"]`` entry that names its block in the transformer options, then
    runs the entry that was there before or the block itself."""

    def __init__(self, block: Block, inner=None):
        self.block = block
        self.inner = inner

    def __call__(self, args: dict, extra: dict) -> dict:
        options = {**(args.get("transformer_options") or {}), BLOCK_KEY: self.block}
        args = {**args, "transformer_options": options}
        return self.inner(args, extra) if self.inner is not None else extra["original_block"](args)


def tag_blocks(model: comfy.model_patcher.ModelPatcher, depth: int, depth_single: int) -> None:
    """Register a :class:`BlockTag` for every double and single block of ``model``."""
    existing = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for kind, count in (("double", depth), ("single", depth_single)):
        for i in range(count):
            name = f"{kind}_block"
            model.set_model_patch_replace(BlockTag((kind, i), existing.get((name, i))), "dit", name, i)


def apply_clear(model: comfy.model_patcher.ModelPatcher, pattern: ClearPattern, weights: ClearWeights | None = None,
                ntk_factor: float = 1.0, proportional: bool = False, min_image_tokens: int = 0,
                backend: str = "auto") -> comfy.model_patcher.ModelPatcher:
    """A clone of ``model`` running CLEAR (the caller's model is left as it was)."""
    network = flux_module(model)
    if model.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY):
        # A second file's "set" patches would land behind the first one's and lose to them, while
        # its window would win: refuse rather than run a silent mix of the two.
        raise ValueError("this model already went through a CLEAR node; connect the model from before it "
                         "(one CLEAR patch per model)")
    patched = model.clone()
    spatial = weights.spatial_weights if weights is not None and pattern.down_factor > 1 else {}
    attention = ClearAttention(pattern, spatial, proportional, backend, check_interrupt)
    notes = ClearNotes(attention, ntk_factor, min_image_tokens)
    if weights is not None:
        add_weights_first(patched, weights)
    if ntk_factor != 1.0:
        # The network's configured base, never the live attribute (a loaded model may carry
        # another patcher's value).
        patched.add_object_patch(THETA_ATTRIBUTE, ntk_theta(network.params.theta, ntk_factor))
    transformer_options = patched.model_options.setdefault("transformer_options", {})
    transformer_options[OVERRIDE_KEY] = ClearOverride(attention, transformer_options.get(OVERRIDE_KEY), notes)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                                 LayoutWrapper(attention, network.patch_size, min_image_tokens, notes))
    if attention.needs_block():
        tag_blocks(patched, len(network.double_blocks), len(network.single_blocks))
    return patched
