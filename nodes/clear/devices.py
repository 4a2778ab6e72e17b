"""CLEAR on several devices: a CLEAR-patched FLUX runs stripe-parallel (:mod:`..models.clear.parallel`)
during sampling, each listed device computing one horizontal stripe of the image's tokens.

How one ComfyUI process drives several GPUs: one thread per device, as ``nn.DataParallel``'s
``parallel_apply`` does and as newer ComfyUI's own multi-GPU sampling does
(``comfy/multigpu.py``: ``MultiGPUThreadPool``, per-device deep clones). Worker processes would
each need the model loaded by ComfyUI's model management, its patches (LoRAs, CLEAR's weights,
other packs' hooks: Python closures) sent over, and a process group set up next to the server;
threads share all of that, and the halo rows go device to device with plain tensor copies
(peer-to-peer where the GPUs allow it). The kernels release the GIL, so the threads' GPU work
overlaps. The same split also runs on a ``torch.distributed`` process group, one process per
device (:func:`split_over_process_group`: the tests' gloo ranks, or ``torchrun``).

Where the split happens: ``Flux.forward_orig`` (an object patch on the clone). Flux's own
``_forward`` builds the image's token ids (the RoPE positions), the Kontext reference tokens and
the output layout from the whole latent, then calls ``forward_orig(img, img_ids, ...)`` with the
patchified tokens: there each device takes its stripe of ``img`` and ``img_ids`` (so its ids are
its global ids), the text and reference tokens, and runs the class's ``forward_orig`` on its own
copy of the model; the stripes' outputs (64 numbers per token) come back to the sampling device.
Everything outside attention is per token; CLEAR's override (:mod:`.hooks`) sees a
:class:`StripeLayout` and does the stripe-parallel attention.

The copies: one per further device, made once and loaded by ComfyUI's model management as
additional models of the sampled model (so memory accounting, offloading and unloading are
ComfyUI's), re-synced to its weight and object patches before each sampling run (a LoRA added
after this node reaches every copy). Where the host has ``ModelPatcher.deepclone_multigpu`` (newer
ComfyUI), a copy is loaded afresh from the model's loader like core's multi-GPU nodes do; on
0.3.64 it is a copy of the unpatched module whose parameters share the CPU tensors of the
original (no second copy in RAM) and get their own device tensors when loaded.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import threading
import weakref
import comfy.ldm.flux.model
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import torch

from ...models.clear import (ClearAttention, Communicator, PeerFailed, ProcessGroupCommunicator, StripeLayout,
                             StripePlan, ThreadGroup, TokenLayout)
from .hooks import LAYOUT_KEY, WRAPPER_KEY, flux_module, size_text

DEVICES_KEY = "ultrares_clear_devices"
FORWARD_ATTRIBUTE = "diffusion_model.forward_orig"
# forward_orig arguments that hold the same tensor on every device (moved to it as they are)
SHARED_ARGUMENTS = ("txt", "txt_ids", "timesteps", "y", "guidance")

log = logging.getLogger(__name__)


def parse_devices(text: str, model_device: torch.device) -> list[torch.device]:
    """The devices a ``devices`` input names, the model's own device first: ``auto`` = every CUDA
    GPU torch sees; a comma list such as ``cuda:0,cuda:1`` (``cpu,cpu`` gives CPU ranks, for
    tests). One device = no split."""
    text = text.strip().lower()
    if text in ("", "auto"):
        count = torch.cuda.device_count() if model_device.type == "cuda" else 0
        others = [torch.device("cuda", i) for i in range(count) if i != (model_device.index or 0)]
        return [model_device, *others]
    devices = []
    for part in text.split(","):
        try:
            device = torch.device(part.strip())
        except RuntimeError:
            raise ValueError(f"devices: {part.strip()!r} is not a device name (examples: cuda:0, cuda:1, cpu)") from None
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"devices: only CUDA GPUs (and cpu for tests) are supported, got {device}")
        devices.append(torch.device("cuda", device.index or 0) if device.type == "cuda" else device)
    if devices[0] != model_device:
        raise ValueError(f"devices: list the device ComfyUI samples this model on first ({model_device}); got "
                         f"{', '.join(map(str, devices))}")
    for device in devices:
        if device.type == "cuda" and device.index >= torch.cuda.device_count():
            raise ValueError(f"devices: {device} does not exist here ({torch.cuda.device_count()} CUDA GPU(s))")
    repeated = sorted({str(d) for d in devices if d.type == "cuda" and devices.count(d) > 1})
    if repeated:
        raise ValueError(f"devices: {', '.join(repeated)} listed twice; each GPU takes one stripe")
    return devices


def _unload_model_and_clones(model: comfy.model_patcher.ModelPatcher) -> None:
    """Unload ``model`` and every loaded clone of it (restoring its unpatched weights on the
    offload device), as newer ComfyUI's ``unload_model_and_clones`` does."""
    unload = getattr(comfy.model_management, "unload_model_and_clones", None)
    if unload is not None:
        unload(model)
        return
    loaded_models = comfy.model_management.current_loaded_models
    for loaded in list(loaded_models):
        if loaded.model is not None and loaded.model.is_clone(model):
            loaded.model_unload()
            loaded_models.remove(loaded)


def _module_sharing_weights(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` whose parameters are new ``Parameter`` objects over the same tensors
    (moving or patching the copy replaces its own parameters, never the original's) and whose
    buffers are the original's (moving a module replaces its buffers, never changes them)."""
    memo: dict[int, object] = {id(p): torch.nn.Parameter(p.data, requires_grad=p.requires_grad)
                               for p in module.parameters()}
    memo.update({id(b): b for b in module.buffers()})
    return copy.deepcopy(module, memo)


class DeviceCopies:
    """The model's copy on every further device, one ModelPatcher each, made once."""

    def __init__(self, devices: list[torch.device]):
        self.devices = devices
        self.patchers: list[comfy.model_patcher.ModelPatcher] = []

    def _make(self, model: comfy.model_patcher.ModelPatcher, device: torch.device) -> comfy.model_patcher.ModelPatcher:
        if hasattr(model, "deepclone_multigpu"):
            # A standalone patcher: no parent for model management to fall back to when it is
            # dropped, none of the sampled model's options, wrappers' models or copies.
            replica = model.deepclone_multigpu(new_load_device=device)
            replica.parent = None
            replica.additional_models = {}
            replica.model_options = {"transformer_options": {}}
            return replica
        _unload_model_and_clones(model)
        network = _module_sharing_weights(model.model)
        # An object patch ComfyUI restored or left on the module: the copy runs its class's method.
        network.diffusion_model.__dict__.pop("forward_orig", None)
        return model.__class__(network, load_device=device, offload_device=model.offload_device,
                               size=model.model_size())

    def prepare(self, model: comfy.model_patcher.ModelPatcher) -> list[comfy.model_patcher.ModelPatcher]:
        """The copies for one sampling run of ``model``, with its weight and object patches."""
        if not self.patchers:
            self.patchers = [self._make(model, device) for device in self.devices]
        for patcher in self.patchers:
            patcher.patches = {key: patches[:] for key, patches in model.patches.items()}
            patcher.patches_uuid = model.patches_uuid
            patcher.object_patches = {name: value for name, value in model.object_patches.items()
                                      if name != FORWARD_ATTRIBUTE}  # copies run the class's forward_orig
            patcher.weight_wrapper_patches = model.weight_wrapper_patches.copy()
            patcher.force_cast_weights = model.force_cast_weights
        return self.patchers

    def networks(self) -> list[torch.nn.Module]:
        """The copies' Flux networks, once ComfyUI has loaded them onto their devices."""
        if len(self.patchers) != len(self.devices):
            raise RuntimeError("CLEAR on several devices: the model's copies were not prepared; sample the model "
                               "through one of ComfyUI's samplers")
        for patcher in self.patchers:
            if patcher.model.device != patcher.load_device:
                raise RuntimeError(f"CLEAR on several devices: the copy for {patcher.load_device} is not loaded "
                                   "there; sample the model through one of ComfyUI's samplers")
        return [patcher.model.diffusion_model for patcher in self.patchers]


def _rank_arguments(bound: inspect.BoundArguments, module: torch.nn.Module, layout: StripeLayout,
                    device: torch.device) -> inspect.BoundArguments:
    """``forward_orig``'s arguments for the layout's rank: its stripe of the image tokens and ids,
    the reference tokens, everything else as it is, on ``device``."""
    arguments = dict(bound.arguments)
    n_img = layout.grid[0] * layout.grid[1]
    tokens = layout.plan.tokens(layout.rank)

    def stripe(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, tokens.start:tokens.stop], x[:, n_img:]], dim=1).to(device)

    arguments["self"] = module
    arguments["img"], arguments["img_ids"] = stripe(arguments["img"]), stripe(arguments["img_ids"])
    for name in SHARED_ARGUMENTS:
        if isinstance(arguments.get(name), torch.Tensor):
            arguments[name] = arguments[name].to(device)
    control = arguments.get("control")
    if control is not None:
        arguments["control"] = {key: [_control_stripe(add, n_img, tokens, device) for add in adds]
                                if isinstance(adds, list) else adds for key, adds in control.items()}
    options = {key: value.to(device) if isinstance(value, torch.Tensor) else value
               for key, value in (arguments.get("transformer_options") or {}).items() if key != DEVICES_KEY}
    options[LAYOUT_KEY] = layout
    arguments["transformer_options"] = options
    return inspect.BoundArguments(bound.signature, arguments)


def _control_stripe(add: torch.Tensor | None, n_img: int, tokens: range, device: torch.device) -> torch.Tensor | None:
    """A ControlNet residual for the image tokens, cut to the stripe."""
    if add is None:
        return None
    if add.shape[1] != n_img:
        raise RuntimeError(f"CLEAR on several devices: a ControlNet residual covers {add.shape[1]} tokens, not the "
                           f"image's {n_img}; it cannot be cut into stripes")
    return add[:, tokens.start:tokens.stop].to(device)


def run_stripe(bound: inspect.BoundArguments, module: torch.nn.Module, layout: StripeLayout,
               device: torch.device) -> torch.Tensor:
    """The layout's stripe through ``module``'s Flux blocks: ``[B, stripe tokens, C]`` on ``device``."""
    rank_bound = _rank_arguments(bound, module, layout, device)
    out = type(module).forward_orig(*rank_bound.args, **rank_bound.kwargs)
    return out[:, :layout.n_img]


class ThreadDriver:
    """Runs every stripe of a call, one thread per device (the first on the calling thread), and
    puts the stripes' outputs together on the first device."""

    def __init__(self, devices: list[torch.device], copies: DeviceCopies):
        self.devices = devices
        self.copies = copies

    @property
    def world_size(self) -> int:
        return len(self.devices)

    def run(self, bound: inspect.BoundArguments, main: torch.nn.Module, plan: StripePlan, layout: TokenLayout,
            ) -> torch.Tensor:
        networks = [main, *self.copies.networks()]
        group = ThreadGroup(len(self.devices))
        layouts = [StripeLayout(layout.grid, layout.n_ref, plan, rank, group.communicator(rank, device))
                   for rank, device in enumerate(self.devices)]
        outputs: list[torch.Tensor | None] = [None] * len(self.devices)
        errors: dict[int, BaseException] = {}
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

        def work(rank: int) -> None:
            device = self.devices[rank]
            on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
            try:
                with on_device, torch.inference_mode(inference), torch.set_grad_enabled(grad):
                    out = run_stripe(bound, networks[rank], layouts[rank], device)
                outputs[rank] = out.to(self.devices[0])
            except BaseException as error:  # a cancel (ComfyUI's interrupt) too: every thread must stop
                errors[rank] = error
                group.abort()

        threads = [threading.Thread(target=work, args=(rank,), name=f"clear-device-{rank}", daemon=True)
                   for rank in range(1, len(self.devices))]
        for thread in threads:
            thread.start()
        work(0)
        for thread in threads:
            thread.join()
        if errors:
            first = min((rank for rank, e in errors.items() if not isinstance(e, PeerFailed)), default=min(errors))
            raise errors[first]
        return torch.cat(outputs, dim=1)


class ProcessGroupDriver:
    """This process is one rank of a ``torch.distributed`` group: it runs its own stripe on its
    model and gathers every rank's stripe, so each rank ends the call with the whole output."""

    def __init__(self, comm: Communicator):
        self.comm = comm

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    def run(self, bound: inspect.BoundArguments, main: torch.nn.Module, plan: StripePlan, layout: TokenLayout,
            ) -> torch.Tensor:
        stripe = StripeLayout(layout.grid, layout.n_ref, plan, self.comm.rank, self.comm)
        out = run_stripe(bound, main, stripe, bound.arguments["img"].device)
        return self.comm.all_gather(out, [len(plan.tokens(p)) for p in range(plan.devices)], dim=1)


class StripeForward:
    """The object patch on the Flux's ``forward_orig``: the class's own ``forward_orig`` unless
    this call comes from a model split by this node (its options carry the driver) and CLEAR runs
    on it (an image above CLEAR's ``min_image_tokens``, no attention mask, not plain attention)."""

    def __init__(self, network: comfy.ldm.flux.model.Flux, attention: ClearAttention):
        self.network = weakref.ref(network)
        self.attention = attention
        self.signature = inspect.signature(type(network).forward_orig)
        self.said: set = set()

    def _once(self, key, message: str, *args) -> None:
        if key not in self.said:
            self.said.add(key)
            log.info(message, *args)

    def __call__(self, *args, **kwargs):
        main = self.network()
        bound = self.signature.bind(main, *args, **kwargs)
        options = bound.arguments.get("transformer_options") or {}
        driver = options.get(DEVICES_KEY)
        layout = options.get(LAYOUT_KEY)
        if driver is not None and isinstance(layout, TokenLayout):
            reason = ("a call with an attention mask" if bound.arguments.get("attn_mask") is not None
                      else "an image the window covers" if self.attention.is_plain_attention(layout) else None)
            if reason is None:
                pattern = self.attention.pattern
                plan = StripePlan.split(layout.grid, driver.world_size, pattern.radius, pattern.down_factor)
                rows = [len(plan.rows(rank)) for rank in range(plan.devices)]
                self._once(("split", layout.grid, plan.devices), "CLEAR on several GPUs: %s split into %d stripes of "
                           "%s token rows, one per device", size_text(layout.grid), plan.devices,
                           ", ".join(map(str, rows)))
                return driver.run(bound, main, plan, layout)
            self._once(("aside", reason), "CLEAR on several GPUs: steps aside for %s: it runs on the model's own "
                       "device", reason)
        return type(main).forward_orig(main, *args, **kwargs)


class SplitWrapper:
    """``APPLY_MODEL`` wrapper: marks each call of this model as one to split (the mark lives in
    the per-call options, so a ``forward_orig`` patch left on a shared module does nothing for
    another clone)."""

    def __init__(self, driver: ThreadDriver | ProcessGroupDriver):
        self.driver = driver

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                 **kwargs):
        options = {**(transformer_options or {}), DEVICES_KEY: self.driver}
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)


class LoadCopies:
    """``PREPARE_SAMPLING`` wrapper: hands ComfyUI the model's copies, synced to the sampled
    model's patches, as additional models it loads onto their devices with the model."""

    def __init__(self, copies: DeviceCopies):
        self.copies = copies

    def __call__(self, executor, model, *args, **kwargs):
        model.set_additional_models(DEVICES_KEY, self.copies.prepare(model))
        return executor(model, *args, **kwargs)


def clear_attention_of(model: comfy.model_patcher.ModelPatcher) -> ClearAttention:
    """The CLEAR attention a model got from the CLEAR node, or a clear error."""
    wrappers = model.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    if not wrappers:
        raise ValueError("CLEAR on several devices needs a model patched by the CLEAR attention (FLUX) node: "
                         "connect that node's output here")
    return wrappers[0].attention


def _split(model: comfy.model_patcher.ModelPatcher, driver: ThreadDriver | ProcessGroupDriver,
           copies: DeviceCopies | None) -> comfy.model_patcher.ModelPatcher:
    network = flux_module(model)
    attention = clear_attention_of(model)
    if model.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, DEVICES_KEY):
        raise ValueError("this model is already split over devices; connect the model from before that node")
    if FORWARD_ATTRIBUTE in model.object_patches:
        raise ValueError("another node replaced this Flux's forward pass (forward_orig), e.g. a caching node; "
                         "CLEAR on several devices needs it: apply that node after this one, or leave it out")
    patched = model.clone()
    patched.add_object_patch(FORWARD_ATTRIBUTE, StripeForward(network, attention))
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, DEVICES_KEY, SplitWrapper(driver))
    if copies is not None:
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, DEVICES_KEY,
                                     LoadCopies(copies))
    return patched


def split_over_devices(model: comfy.model_patcher.ModelPatcher, devices: list[torch.device]
                       ) -> comfy.model_patcher.ModelPatcher:
    """A clone of a CLEAR-patched FLUX that samples stripe-parallel on ``devices`` (the model's
    own device first), one thread each; one device gives an unchanged clone."""
    if len(devices) == 1:
        return model.clone()
    copies = DeviceCopies(devices[1:])
    return _split(model, ThreadDriver(devices, copies), copies)


def split_over_process_group(model: comfy.model_patcher.ModelPatcher, comm: Communicator | None = None
                             ) -> comfy.model_patcher.ModelPatcher:
    """A clone of a CLEAR-patched FLUX of which this process runs one stripe, on its own device,
    in a ``torch.distributed`` group (default: the world); every rank samples the same way."""
    comm = comm or ProcessGroupCommunicator()
    if comm.world_size == 1:
        return model.clone()
    return _split(model, ProcessGroupDriver(comm), None)
