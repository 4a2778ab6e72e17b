"""Inf-DiT (arXiv 2405.04312): a pixel-space DiT upsampler evaluated block batch by block batch.

Host-free. The nodes (``nodes/infdit/``) load weights with :func:`load_infdit`, ask the host
for :func:`working_memory`, plan with :func:`plan_budget` once the model is loaded, and run
:func:`upscale` with callbacks for progress and interruption. One evaluation can also be run
piece by piece: :func:`plan_schedule` describes it as plain data (the batches, their
dependencies, each batch's cache steps) and :func:`evaluate` carries a schedule out.

Modules: ``network`` (the DiT; ``attention``: block layout, UniBA gather, RoPE), ``clip_vision``
(its CLIP tower), ``config`` (sizes), ``checkpoint`` (weight files: names, sizes, loading; ``cli/infdit_convert.py``
converts them), ``files`` (the two kinds of file, which can be the CLIP tower, the safe reading of the
released pickle), ``schedule`` (batches, cache policy, placement), ``evaluate`` (one evaluation: the
neighbour cache, layer 0's LR keys), ``memory`` (the memory model), ``budget`` (a request and
free memory to a plan), ``sampler`` (EDM Heun), ``preprocess`` (the reference's resizing),
``upscale`` (the pipeline), ``progress`` (what it reports while it runs: counts and a
preview), ``tiny`` (built-in tiny models) and ``_full_reference`` (the
whole-image computation the scheduler is tested against). Several devices and machines:
``shard`` (a rank's band of the image), ``exchange`` (torch.distributed: boundary keys, the
result's pixels, the stop flag), ``pipeline`` (the modelled fill and traffic), ``worker``
(what a rank runs) and ``launch`` (local worker processes).
"""

from .budget import (BudgetPlan, UpscaleOptions, allocator_headroom, plan_budget, plan_stage, total_batches,
                     weight_bytes, working_memory)
from .checkpoint import DTYPES, InfDiTWeights, WeightSource, convert_checkpoint, load_infdit
from .clip_vision import ClipVisionConfig, ClipVisionEncoder
from .config import RELEASED, InfDiTConfig
from .evaluate import Exchange, ImageContext, LRContext, evaluate
from .exchange import BlockExchange, RankGroup, Stopped, join
from .files import InfDiTCheckpointError, holds_clip_tower, not_a_clip_tower
from .launch import RankFailed, parse_devices, run_ranks, upscale_on_ranks
from .memory import (GiB, BudgetTooSmall, MemoryEstimate, choose_batch_size, estimate_memory, memory_text,
                     offloaded_host_bytes)
from .network import InfDiT, Operations
from .progress import PreviewCanvas, PreviewMosaic, UpscaleStep, encode_piece
from .pipeline import PipelineModel, model_pipeline, ranks_batch_size
from .schedule import (SCAN_ORDERS, BlockBatch, CacheSteps, HostObserver, Placement, ScanOrder, Schedule, Transfer,
                       assign_stripes, plan_batches, plan_ranks, plan_schedule)
from .shard import ImageShard
from .tiny import TINY, TINY_CLIP, tiny_weights
from .upscale import upscale
from .worker import host_free_bytes, upscale_job

__all__ = [
    # Weight files
    "InfDiTWeights",        # the DiT and its CLIP tower, loaded
    "load_infdit",          # a released .pt or converted .safetensors -> InfDiTWeights
    "convert_checkpoint",   # the released .pt -> a verified safetensors in the pack's names
    "DTYPES",               # the precisions to load or convert in: "bf16", "fp16", "fp32"
    "InfDiTCheckpointError",  # a weight file the loader refuses, with the reason and what to do
    "WeightSource",         # a weight file (or the tiny model) as plain data, for processes to load
    "holds_clip_tower",     # whether a file can be the separate CLIP tower (from its names, nothing loaded)
    "not_a_clip_tower",     # why a file is not offered as the CLIP tower: what it is instead
    # Upscaling
    "UpscaleOptions",       # scale, steps, seed, budget, batch size, scan order, offloading
    "upscale",              # images -> upscaled images, block batch by block batch
    "total_batches",        # block batches of a whole upscale (a progress bar's total)
    "UpscaleStep",          # where an upscale is: image, pass, evaluation, batch (describe() for users)
    "PreviewCanvas",        # a small picture of the image being built, painted batch by batch
    # Several devices and machines
    "parse_devices",        # "cuda:0,cuda:1" / "cpu,cpu" -> devices
    "upscale_on_ranks",     # upscale shared by one local worker process per device
    "run_ranks",            # run a function on one local process per device, with stop and progress
    "RankFailed",           # a rank raised: which one, on which device, and its error
    "join",                 # a torchrun / store rendezvous -> this process's RankGroup
    "upscale_job",          # what one rank runs of an upscale (weights, images, options as plain data)
    "host_free_bytes",      # host RAM available, to plan a CPU rank with
    "RankGroup",            # a rank's process groups, stop flag and progress counter
    "Stopped",              # raised in a rank when the run's stop flag is set
    "encode_piece",         # a rank's band of its preview, as bytes for the store
    "PreviewMosaic",        # the ranks' preview bands put together
    "BlockExchange",        # a rank's sends and receives of boundary K/V (torch.distributed P2P)
    "Exchange",             # what evaluate() needs from a rank's exchange
    "ImageShard",           # the band of an image-sized buffer one rank keeps
    "plan_ranks",           # every rank's schedule of one evaluation (stripes of lines)
    "assign_stripes",       # the rank of each batch: lines in contiguous stripes
    "Transfer",             # blocks received from or sent to another rank after a batch
    "PipelineModel",        # a modelled distributed sample: fill, speed-up, blocks sent
    "model_pipeline",       # the modelled timeline of a distributed sample
    "ranks_batch_size",     # the batch size that keeps several ranks busy
    # Planning under a memory budget
    "GiB",                  # bytes per GiB, the unit of budgets
    "memory_text",          # bytes as a user reads them: "9.87 GiB", "640 MiB"
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
