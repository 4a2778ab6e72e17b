"""Inf-DiT (arXiv 2405.04312): a pixel-space DiT upsampler evaluated block batch by block batch.

Host-free. The nodes (``nodes/infdit.py``) load weights with :func:`load_infdit`, ask the host
for :func:`working_memory`, plan with :func:`plan_budget` once the model is loaded, and run
:func:`upscale` with callbacks for progress and interruption. One evaluation can also be run
piece by piece: :func:`plan_schedule` describes it as plain data (the batches, their
dependencies, each batch's cache steps) and :func:`evaluate` carries a schedule out.

Modules: ``network`` (the DiT; ``attention``: block layout, UniBA gather, RoPE), ``clip_vision``
(its CLIP tower), ``config`` (sizes), ``checkpoint`` (weight files; ``convert``: the command
line), ``schedule`` (batches, cache policy, placement), ``evaluate`` (one evaluation: the
neighbour cache, layer 0's LR keys), ``memory`` (the memory model), ``budget`` (a request and
free memory to a plan), ``sampler`` (EDM Heun), ``preprocess`` (the reference's resizing),
``upscale`` (the pipeline), ``tiny`` (built-in tiny models) and ``_full_reference`` (the
whole-image computation the scheduler is tested against).
"""

from .budget import (BudgetPlan, UpscaleOptions, allocator_headroom, plan_budget, plan_stage, weight_bytes,
                     working_memory)
from .checkpoint import CheckpointError, InfDiTWeights, convert_checkpoint, load_infdit
from .clip_vision import ClipVisionConfig, ClipVisionEncoder
from .config import RELEASED, InfDiTConfig
from .evaluate import ImageContext, LRContext, evaluate
from .memory import GiB, BudgetTooSmall, MemoryEstimate, choose_batch_size, estimate_memory, offloaded_host_bytes
from .network import InfDiT, Operations
from .schedule import (SCAN_ORDERS, BlockBatch, CacheSteps, HostObserver, Placement, ScanOrder, Schedule,
                       plan_batches, plan_schedule)
from .tiny import TINY, TINY_CLIP, tiny_weights
from .upscale import upscale

__all__ = [
    # Weight files
    "InfDiTWeights",        # the DiT and its CLIP tower, loaded
    "load_infdit",          # a released .pt or converted .safetensors -> InfDiTWeights
    "convert_checkpoint",   # the released .pt -> a verified safetensors in the pack's names
    "CheckpointError",      # a weight file the loader refuses, with the reason
    # Upscaling
    "UpscaleOptions",       # scale, steps, seed, budget, batch size, scan order, offloading
    "upscale",              # images -> upscaled images, block batch by block batch
    # Planning under a memory budget
    "GiB",                  # bytes per GiB, the unit of budgets and messages
    "BudgetTooSmall",       # not even one block per batch fits
    "allocator_headroom",   # the margin to plan with on a device
    "working_memory",       # device memory to have freed before planning
    "plan_budget",          # request + free memory -> BudgetPlan
    "BudgetPlan",           # the options as they will run, the stages' memory, what to log
    "plan_stage",           # one stage's batch size and memory
    "weight_bytes",         # device bytes of the loaded weights
    # The memory model
    "MemoryEstimate",       # device bytes of a plan, by term
    "estimate_memory",      # the memory model for a size and batch size
    "choose_batch_size",    # the largest batch size under a budget
    "offloaded_host_bytes", # host RAM that offloading takes
    # One evaluation, block batch by block batch
    "ScanOrder",            # "auto", "row" or "column"
    "SCAN_ORDERS",          # the scan orders, for a choice list
    "BlockBatch",           # a rectangle of blocks computed in one pass
    "plan_batches",         # n x n batches covering the block grid in scan order
    "plan_schedule",        # batches -> Schedule (the one cache policy)
    "Schedule",             # batches, their dependencies, their cache steps, as plain data
    "CacheSteps",           # what one batch reads, drops, offloads and stores
    "Placement",            # the compute device, and whether image-sized tensors wait on the host
    "HostObserver",         # told about host allocations (a CPU memory meter)
    "ImageContext",         # an image's conditioning, fixed while it is sampled
    "LRContext",            # layer 0's LR keys and values, per batch
    "evaluate",             # one denoiser evaluation D(x; sigma) following a Schedule
    # Networks
    "InfDiTConfig",         # the sizes of an Inf-DiT
    "RELEASED",             # the released model's sizes
    "InfDiT",               # the DiT
    "ClipVisionConfig",     # the sizes of an OpenCLIP image tower
    "ClipVisionEncoder",    # the CLIP image tower that gives the DiT its condition
    "Operations",           # the layer classes networks are built from (torch.nn, comfy.ops ...)
    # Built-in tiny models: the download-free demo, tests and benchmarks
    "TINY",                 # a 2-layer, 64-wide Inf-DiT with 16-px blocks
    "TINY_CLIP",            # a 2-layer CLIP tower
    "tiny_weights",         # random tiny weights, deterministic in a seed
]
