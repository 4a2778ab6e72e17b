"""CLEAR distillation inside ComfyUI: the host-free loop of ``models/clear/distill.py`` driven
through ComfyUI's own sampling of the FLUX model (:mod:`..training`; the node and the command
line share this).

One ModelPatcher runs teacher and student, both through the guider:

- It is the CLEAR patch node's clone (:func:`.hooks.apply_clear`, the same attention override,
  ``APPLY_MODEL`` wrapper and block tags), with the student's ``spatial_weight`` parameters as
  the layers' spatial weights. A teacher call drops the CLEAR wrapper from that call's model
  options, so the override sees no token layout and hands every call to the model's own
  (full) attention.
- Weight wrappers on the fused projections (``img_attn.qkv``, ``img_attn.proj``,
  ``single_blocks.N.linear1``) put the student's trainable slices in place of the teacher's
  during student calls (:func:`ultrares.models.clear.student.assemble`), placed by the patch
  node's own file-to-model plan; teacher calls get the model's weights as they are, any LoRA
  on them included.
- ComfyUI's Flux blocks add their residuals in place (``txt +=``, ``x +=``) into tensors their
  LayerNorms keep for the backward pass, which autograd refuses; object patches make those
  LayerNorms keep a copy when gradients are recorded.
- Student calls run every block under activation checkpointing (recomputed in the backward
  pass, one block at a time, as the reference's ``--gradient_checkpointing``); block inputs are
  copied inside the recomputed function so the in-place residuals cannot change what the
  recomputation starts from, and the block function and options are pinned as they were
  (:func:`pinned`). The distilled layers' attention outputs are captured by an
  attention override the block entry installs around whatever override is there.

Runs outside ComfyUI's inference mode: the student's parameters, the captured activations and
the weight copies must be usable by autograd.
"""

from __future__ import annotations

import hashlib
import logging
import types
from collections.abc import Callable
from pathlib import Path

import comfy.model_patcher
import comfy.patcher_extension
import comfy.utils
import torch
from torch.utils.checkpoint import checkpoint

from ...models.clear import (ATTENTION, CLEAR_OPTIMIZER_STATE, FLOW_MATCHING, OPTIMIZER_FORMAT, PREDICTION, Block,
                             ClearDistillSettings, ClearPattern, ClearStudent, ClearTrainingRecord, ClearWeights,
                             FolderSamples, Prediction, assemble, derived_seed, distill, file_dtype, make_optimizer,
                             optimized_tensors, plan_weights, read_distilled, released_keys, save_distilled)
from ...models.training import TOTAL, OffloadedAdamW, load_optimizer_state, optimizer_path, save_optimizer_state
from ..distill_report import DistillReport, loss_with_mean, with_report
from ..training import SamplingContext, TrajectorySettings, inside_sampling, options_clone, with_weight_copies
from .hooks import WRAPPER_KEY, apply_clear, flux_module
from .override_slot import OVERRIDE_KEY

log = logging.getLogger(__name__)

SAMPLES_SUFFIX = ".samples"  # <weights>.samples/: the teacher's samples, kept for resuming


class Mode:
    """Which network a call of the training patcher runs: the teacher (the model's weights), the
    student (its trainable slices), or the teacher while recording the weights it uses."""

    TEACHER, STUDENT, RECORD = "teacher", "student", "record"

    def __init__(self) -> None:
        self.current = self.TEACHER
        self.recorded: dict[str, torch.Tensor] = {}


class StudentSlices:
    """Weight wrapper of one fused Flux tensor: the student's slices in place of the teacher's."""

    def __init__(self, pieces: list[tuple[str, tuple[int, int, int] | None, torch.Tensor]], mode: Mode):
        self.pieces, self.mode = pieces, mode

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        if self.mode.current == Mode.STUDENT:
            return assemble(weight, [(offset, tensor) for _, offset, tensor in self.pieces])
        if self.mode.current == Mode.RECORD:
            for key, offset, _ in self.pieces:
                part = weight if offset is None else weight.narrow(*offset)
                self.mode.recorded[key] = part.detach().to("cpu", torch.float32, copy=True)
        return weight


class CopyingNorm(torch.nn.Module):
    """A block's LayerNorm that normalises a copy of its input while gradients are recorded, so
    the block's in-place residual add does not change the tensor the norm keeps for backward."""

    def __init__(self, norm: torch.nn.Module):
        super().__init__()
        object.__setattr__(self, "norm", norm)  # not a submodule: the model's state dict stays the same

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.clone() if torch.is_grad_enabled() and x.requires_grad else x)


class CaptureAttention:
    """``optimized_attention_override`` that records the output of the calls it passes on."""

    memory_efficient = True

    def __init__(self, previous, sink: list):
        self.previous, self.sink = previous, sink

    def __call__(self, func, *args, **kwargs):
        out = self.previous(func, *args, **kwargs) if self.previous is not None else func(*args, **kwargs)
        self.sink.append(out)
        return out


def pinned(function: Callable) -> Callable:
    """``function`` with the variables it closes over fixed at their current values.

    ComfyUI's ``original_block`` (``block_wrap`` in ``Flux.forward_orig``) reads the loop
    variable ``block`` when called; a recomputation in the backward pass, after the loop, would
    run the last block of the model instead of this one.
    """
    closure = getattr(function, "__closure__", None)
    if not closure:
        return function
    cells = []
    for cell in closure:
        try:
            cells.append(types.CellType(cell.cell_contents))
        except ValueError:  # a variable not bound yet
            cells.append(types.CellType())
    copy = types.FunctionType(function.__code__, function.__globals__, function.__name__, function.__defaults__,
                              tuple(cells))
    copy.__kwdefaults__ = function.__kwdefaults__
    return copy


class BlockEntry:
    """``patches_replace["dit"]`` entry for one block: runs the entry that was there (the CLEAR
    block tag, another pack's) or the block, capturing its attention output into ``captured``
    when asked, under activation checkpointing when ``recompute``."""

    def __init__(self, block: Block, inner, captured: dict[Block, torch.Tensor] | None, recompute: bool, mode: Mode):
        self.block, self.inner, self.captured, self.recompute, self.mode = block, inner, captured, recompute, mode
        self.streams = ("img", "txt") if block[0] == "double" else ("img",)

    def _run(self, args: dict, extra: dict, *streams: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sink: list = []
        options = dict(args.get("transformer_options") or {})
        if self.captured is not None:
            options[OVERRIDE_KEY] = CaptureAttention(options.get(OVERRIDE_KEY), sink)
        # Copies: the block adds its residual into its inputs in place, and a recomputation
        # must start from the values this call started from.
        call = {**args, **{name: t.clone() for name, t in zip(self.streams, streams)}, "transformer_options": options}
        out = self.inner(call, extra) if self.inner is not None else extra["original_block"](call)
        results = tuple(out[name] for name in self.streams)
        if self.captured is not None:
            if len(sink) != 1:
                raise RuntimeError(f"CLEAR distill: {self.block[0]} block {self.block[1]} made {len(sink)} attention "
                                   "calls, expected one")
            results += (sink[0],)
        return results

    def _recomputable(self, mode: str, args: dict, extra: dict, *streams: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """:meth:`_run` as the call ran it: the recomputation comes in the backward pass, after the
        host switched its weights back to the teacher's."""
        previous, self.mode.current = self.mode.current, mode
        try:
            return self._run(args, extra, *streams)
        finally:
            self.mode.current = previous

    def __call__(self, args: dict, extra: dict) -> dict:
        streams = tuple(args[name] for name in self.streams)
        # What a recomputation needs, as it is now: the host changes its options dict from block
        # to block (newer ComfyUI's block_index) and its original_block reads the loop variable.
        args = {**args, "transformer_options": dict(args.get("transformer_options") or {})}
        extra = {**extra, "original_block": pinned(extra["original_block"])}
        if self.recompute and torch.is_grad_enabled():
            results = checkpoint(self._recomputable, self.mode.current, args, extra, *streams, use_reentrant=False)
        else:
            results = self._run(args, extra, *streams)
        if self.captured is not None:
            self.captured[self.block] = results[-1]
        return dict(zip(self.streams, results))


def _key_map(network) -> dict:
    return comfy.utils.flux_to_diffusers({"depth": len(network.double_blocks),
                                          "depth_single_blocks": len(network.single_blocks),
                                          "hidden_size": network.hidden_size}, output_prefix="diffusion_model.")


def student_placement(model: comfy.model_patcher.ModelPatcher, student: ClearStudent) -> ClearWeights:
    """The student's tensors placed on ``model``'s parameters by the patch node's own plan."""
    network = flux_module(model)
    shapes = {key: tuple(value.shape) for key, value in model.model.state_dict().items()}
    return plan_weights(student.by_key(), _key_map(network), shapes, len(network.double_blocks),
                        len(network.single_blocks), "the CLEAR student")


def training_patcher(model: comfy.model_patcher.ModelPatcher, student: ClearStudent
                     ) -> tuple[comfy.model_patcher.ModelPatcher, Mode]:
    """The patcher that runs teacher and student (module docstring), and the switch between them."""
    placement = student_placement(model, student)
    training = apply_clear(model, student.pattern, ClearWeights([], student.spatial_weights()))
    training = with_weight_copies(training)
    mode = Mode()
    by_key = {key: tensor for key, tensor in student.by_key().items()}
    key_of = {id(tensor): key for key, tensor in by_key.items()}
    pieces: dict[str, list] = {}
    for patch in placement.patches:
        pieces.setdefault(patch.target, []).append((key_of[id(patch.tensor)], patch.offset, patch.tensor))
    for target, parts in pieces.items():
        training.add_weight_wrapper(target, StudentSlices(parts, mode))
    network = flux_module(model)
    for prefix, blocks in (("double_blocks", network.double_blocks), ("single_blocks", network.single_blocks)):
        for i, block in enumerate(blocks):
            for name, module in block.named_children():
                # The live model may still carry an earlier training patcher's object patches
                # (ComfyUI keeps the last model loaded with its patches): wrap the original norm.
                norm = module.norm if isinstance(module, CopyingNorm) else module
                if isinstance(norm, torch.nn.LayerNorm):
                    training.add_object_patch(f"diffusion_model.{prefix}.{i}.{name}", CopyingNorm(norm))
    return training, mode


class ComfyClearHost:
    """:class:`~ultrares.models.clear.distill.ClearDistillHost` over a ComfyUI guider (inside its sampler)."""

    def __init__(self, context: SamplingContext, mode: Mode, depth: int, depth_single: int, recompute: bool = True):
        self.context, self.mode, self.recompute = context, mode, recompute
        self.blocks = [("double", i) for i in range(depth)] + [("single", i) for i in range(depth_single)]
        self.prompt_count = len(context.positive)

    def sigmas(self) -> torch.Tensor:
        return self.context.sigmas

    def start(self, seed: int) -> torch.Tensor:
        return self.context.start(seed)

    def _options(self, clear: bool, entries: dict[Block, BlockEntry]) -> dict:
        options = options_clone(self.context.model_options)
        if not clear:
            wrappers = options.get("transformer_options", {}).get("wrappers", {})
            wrappers.get(comfy.patcher_extension.WrappersMP.APPLY_MODEL, {}).pop(WRAPPER_KEY, None)
        existing = options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
        for block, entry in entries.items():
            name = f"{block[0]}_block"
            entry.inner = existing.get((name, block[1]))
            options = comfy.model_patcher.set_model_options_patch_replace(options, entry, "dit", name, block[1])
        return options

    def _velocity(self, x: torch.Tensor, sigma: torch.Tensor, prompt: int, options: dict, mode: str) -> torch.Tensor:
        self.mode.current = mode
        try:
            denoised = self.context.denoise(x, sigma, prompt, options, cfg=1.0)
        finally:
            self.mode.current = Mode.TEACHER
        return (x - denoised) / sigma

    def guided(self, x: torch.Tensor, sigma: torch.Tensor, prompt: int) -> torch.Tensor:
        with torch.no_grad():
            return self.context.denoise(x, sigma, prompt, self._options(False, {}))

    def teacher(self, x: torch.Tensor, sigma: torch.Tensor, prompt: int, blocks: list[Block]) -> Prediction:
        captured: dict[Block, torch.Tensor] = {}
        entries = {block: BlockEntry(block, None, captured, False, self.mode) for block in blocks}
        with torch.no_grad():
            velocity = self._velocity(x, sigma, prompt, self._options(False, entries), Mode.TEACHER)
        return Prediction(velocity, captured)

    def student(self, x: torch.Tensor, sigma: torch.Tensor, prompt: int, blocks: list[Block],
                student: ClearStudent) -> Prediction:
        captured: dict[Block, torch.Tensor] = {}
        wanted = set(blocks)
        entries = {block: BlockEntry(block, None, captured if block in wanted else None, self.recompute, self.mode)
                   for block in self.blocks}
        velocity = self._velocity(x, sigma, prompt, self._options(True, entries), Mode.STUDENT)
        return Prediction(velocity, captured)

    def teacher_weights(self) -> dict[str, torch.Tensor]:
        """The attention projections the teacher computes with (its LoRAs and other weight
        patches applied), in the released layout: what the student starts from."""
        self.mode.recorded.clear()
        with torch.no_grad():
            self._velocity(self.start(0), self.sigmas()[0], 0, self._options(False, {}), Mode.RECORD)
        return dict(self.mode.recorded)


def _fingerprint(conditioning: list | None) -> str:
    """A digest of CONDITIONING (its tensors and plain values), to tell prompts apart."""
    digest = hashlib.blake2b(digest_size=16)
    for cond, extras in conditioning or []:
        for value in (cond, *(extras[k] for k in sorted(extras))):
            if torch.is_tensor(value):
                digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            elif isinstance(value, (int, float, str, bool)):
                digest.update(repr(value).encode())
    return digest.hexdigest()


def sample_recipe(model: comfy.model_patcher.ModelPatcher, positive: list, negative: list | None,
                  trajectory: TrajectorySettings, settings: ClearDistillSettings) -> dict:
    """What the teacher's samples depend on (a sample folder made with anything else is redone)."""
    return {"base_model": base_model_name(model), "positive": _fingerprint(positive), "negative": _fingerprint(negative),
            "width": trajectory.width, "height": trajectory.height, "sampling_steps": trajectory.sampling_steps,
            "cfg": trajectory.cfg, "scheduler": trajectory.scheduler, "seed": settings.seed}


def teacher_fingerprint(host: ComfyClearHost, seed: int) -> str:
    """A digest of the teacher's guided prediction on one fixed noisy latent.

    The family name, prompts and settings do not tell two models of one family apart (two
    fine-tunes, a merge, the same model with a LoRA), and samples of one must never train a
    student of the other; their predictions differ. One forward pass, against the thousands a
    run's samples cost. Rounded to bfloat16 so that the digest does not hang on the last bits;
    where it still differs (another GPU, another kernel), the samples are made again: slower,
    never wrong.
    """
    with torch.no_grad():
        denoised = host.guided(host.start(derived_seed(seed, "fingerprint")), host.sigmas()[0], 0)
    values = denoised.detach().to("cpu", torch.float32).to(torch.bfloat16).view(torch.int16)
    return hashlib.blake2b(values.contiguous().numpy().tobytes(), digest_size=16).hexdigest()


def base_model_name(model: comfy.model_patcher.ModelPatcher) -> str:
    """ComfyUI's name for the model's family (``Flux``, ``FluxSchnell`` ...)."""
    return type(model.model.model_config).__name__


def compute_dtype(model: comfy.model_patcher.ModelPatcher) -> torch.dtype:
    """The dtype the model computes in (its manual-cast dtype for fp8 and other stored formats)."""
    return getattr(model.model, "manual_cast_dtype", None) or model.model.get_dtype()


def loss_text(record: ClearTrainingRecord) -> str:
    """The latest losses: ``"loss 0.412 (mean of the last 50: 0.430) · flow matching 0.3, ..."``."""
    terms = [f"{name} {record.losses[name][-1]:.3g}" for name in (FLOW_MATCHING, PREDICTION, ATTENTION)
             if record.losses.get(name)]
    return loss_with_mean(record.losses[TOTAL]) + (" · " + ", ".join(terms) if terms else "")


def distill_report(path: Path, steps: int, emit: Callable[[str], None],
                   status: Callable[[str, int, int], None] | None = None) -> DistillReport[ClearTrainingRecord]:
    """The report of a CLEAR run (its losses in :func:`loss_text`'s words)."""
    return DistillReport(path, steps, loss_text, emit, status)


def run_clear_distillation(model: comfy.model_patcher.ModelPatcher, positive: list, negative: list | None,
                           path: Path, pattern: ClearPattern, settings: ClearDistillSettings,
                           trajectory: TrajectorySettings, resume: bool,
                           on_progress: Callable[[int, int], None] | None = None,
                           check_interrupt: Callable[[], None] | None = None,
                           recompute: bool = True,
                           report: DistillReport[ClearTrainingRecord] | None = None
                           ) -> tuple[ClearStudent, ClearTrainingRecord]:
    """Distil CLEAR weights for ``model`` into ``path`` (resuming it when asked); returns them.

    Beside ``path``: ``<path>.optimizer`` (AdamW's state and the float32 values, for an exact
    resume) and ``<path>.samples/`` (the teacher's samples, reused while the recipe and the
    teacher's :func:`teacher_fingerprint` are the same).
    With ``settings.optimizer_on_cpu`` the float32 values and AdamW's state stay in host memory
    and the device holds the student's tensors in the model's compute dtype.
    ``report`` hears every step, every save and the end (a stop is the caller's to report: the
    exception comes out of here after the save).
    """
    network = flux_module(model)
    depth, depth_single = len(network.double_blocks), len(network.single_blocks)
    if path.exists() and not resume:
        raise FileExistsError(f"{path.name} already exists: turn on resume to continue training it, or choose "
                              "another output name")
    state_path = optimizer_path(path)
    with torch.inference_mode(False), torch.enable_grad():
        fresh = not (resume and path.exists())
        if fresh:
            hidden = network.hidden_size
            shapes = {key: (hidden, hidden) if key.endswith(".weight") else (hidden,)
                      for key in released_keys(depth, depth_single, False)}
            student, record = ClearStudent({k: torch.zeros(s) for k, s in shapes.items()}, pattern, depth,
                                           depth_single), ClearTrainingRecord()
            state_path.unlink(missing_ok=True)  # left by a run whose weights were deleted
        else:
            tensors, _, _, record = read_distilled(path, pattern)
            student = ClearStudent(tensors, pattern, depth, depth_single)
        # Float32 on the device, or (optimizer in RAM) only the precision the forward uses.
        student.to(model.load_device, compute_dtype(model) if settings.optimizer_on_cpu else torch.float32)
        optimizer = make_optimizer(student, settings)
        optimized = optimized_tensors(student, optimizer)
        if record.steps and not load_optimizer_state(state_path, optimized, optimizer, record.steps,
                                                     CLEAR_OPTIMIZER_STATE):
            log.warning("CLEAR distill: no optimizer state saved with %s at step %d (%s); the optimizer starts "
                        "afresh from the file's weights", path.name, record.steps, state_path.name)
        if isinstance(optimizer, OffloadedAdamW):
            optimizer.push()  # the restored float32 values, if any, onto the device
        training, mode = training_patcher(model, student)
        dtype, base = file_dtype(compute_dtype(model)), base_model_name(model)

        def save(r: ClearTrainingRecord) -> None:
            save_distilled(path, student, base, r, dtype)
            save_optimizer_state(state_path, optimized, optimizer, r.steps, OPTIMIZER_FORMAT, masters=True)
            if report is not None:
                report.saved(r)

        def run(context: SamplingContext) -> ClearTrainingRecord:
            host = ComfyClearHost(context, mode, depth, depth_single, recompute)
            recipe = sample_recipe(model, positive, negative, trajectory, settings)
            recipe["teacher"] = teacher_fingerprint(host, settings.seed)
            samples = FolderSamples(path.with_name(path.name + SAMPLES_SUFFIX), recipe)
            if fresh:
                recorded = host.teacher_weights()
                with torch.no_grad():
                    for key, tensor in optimized.items():
                        if key in recorded:
                            tensor.copy_(recorded[key])
                if isinstance(optimizer, OffloadedAdamW):
                    optimizer.push()
            return distill(host, student, settings, samples, record, save=save,
                           on_progress=with_report(on_progress, report, record),
                           check_interrupt=check_interrupt, optimizer=optimizer)

        try:
            record = inside_sampling(training, positive, negative, trajectory, settings.seed, run)
        finally:
            if isinstance(optimizer, OffloadedAdamW):
                optimizer.close()
    student.to("cpu")
    if report is not None:
        report.finished(record)
    return student, record
