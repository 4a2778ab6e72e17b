"""CLEAR for FLUX, host-free: the pattern settings of a released file, the down-sampled key
branch, the released files' key layout and its mapping onto a Flux, and the per-call attention
that ties them to :func:`ultrares.kernels.clear_attention.circular_window_attention`; for
several devices, the image's stripes and halos (``stripes``), the steps devices take together
(``communicator``: torch.distributed or threads of one process) and the exact stripe-parallel
attention call (``parallel``).

The node (``nodes/clear/``) reads a file with :func:`read_clear_file`, checks it against the
model with :func:`plan_weights`, picks the window with :func:`resolve_pattern` and runs
:class:`ClearAttention` from its attention override. The CLEAR Distill node (and
``cli/clear_distill.py``) makes such files: it drives :func:`distill` through a
:class:`ClearDistillHost` of its own, training a :class:`ClearStudent`.
"""

from ...kernels import BACKENDS, Backend
from .attention import ClearAttention, TokenLayout
from .distill import (ATTENTION, FLOW_MATCHING, PREDICTION, ClearDistillHost, ClearDistillSettings, ClearTrainingRecord,
                      Prediction, attention_loss_blocks, derived_seed, distill, make_optimizer, optimized_tensors)
from .distilled import CLEAR_OPTIMIZER_STATE, OPTIMIZER_FORMAT, file_dtype, read_distilled, save_distilled
from .communicator import Communicator, MeteredCommunicator, PeerFailed, ProcessGroupCommunicator, ThreadGroup
from .parallel import StripeLayout, call_payload
from .pattern import ClearPattern, ntk_theta, resolve_pattern, softmax_scale
from .samples import FolderSamples, MemorySamples
from .stripes import StripeError, StripePlan
from .student import ClearStudent, assemble
from .training_cost import training_memory
from .weights import (CLEAR_WEIGHTS, Block, ClearWeights, ClearWeightsError, WeightPatch, plan_weights, read_clear_file,
                      released_keys)

__all__ = [
    # Weight files
    "read_clear_file",      # a released CLEAR file -> its tensors and metadata, broken files refused by name
    "plan_weights",         # a file checked against a Flux -> ClearWeights
    "ClearWeights",         # the weight replacements and each layer's spatial weight
    "WeightPatch",          # one replacement: a Flux parameter (or its slice) and the file's tensor
    "Block",                # ("double" | "single", index): the block a key or a call belongs to
    "released_keys",        # every key a released file holds for a Flux of given depths
    "ClearWeightsError",    # a CLEAR file the loader refuses, with the reason and what to do
    "CLEAR_WEIGHTS",        # what a CLEAR file is, for the weight-file checks and messages
    # The pattern
    "ClearPattern",         # window radius and down factor
    "resolve_pattern",      # file name, metadata and overrides -> the ClearPattern to run
    "softmax_scale",        # 1/sqrt(d), or the high-resolution recipe's proportional scale
    "ntk_theta",            # the recipe's NTK-scaled RoPE base
    # Attention in a Flux
    "ClearAttention",       # one CLEAR attention call: q, k, v and the token layout -> output
    "TokenLayout",          # the image grid and reference tokens of one forward pass
    "Backend",              # the backend= argument's values
    "BACKENDS",             # the backend choices, for a choice list
    # Distillation (making a file for a model)
    "ClearStudent",         # the trainable tensors of a released file, keyed like it
    "assemble",             # a fused Flux weight with the student's slices in place of the teacher's
    "ClearDistillHost",     # what the loop needs from the model being distilled
    "Prediction",           # one forward pass: velocity and the distilled layers' attention outputs
    "ClearDistillSettings", # steps, learning rate, batch, samples, loss weights, seed, save interval
    "ClearTrainingRecord",  # steps, every loss term per step, settings
    "distill",              # train the student as the reference does
    "attention_loss_blocks", # the layers whose attention output is distilled (single blocks 1, 5, ...)
    "derived_seed",         # a seed from named parts: every draw of a run follows from its seed
    "make_optimizer",       # the reference's AdamW (or with its state in RAM)
    "optimized_tensors",    # the float32 tensors the optimiser updates, by file key
    "FLOW_MATCHING",        # the loss terms' names in the record
    "PREDICTION",
    "ATTENTION",
    "MemorySamples",        # the teacher's samples in memory
    "FolderSamples",        # the teacher's samples in a folder beside the file, for resuming
    "save_distilled",       # a student -> a released-layout file with its metadata (atomic)
    "read_distilled",       # a distilled file -> tensors, pattern, base model, record (to resume)
    "file_dtype",           # the precision a file for a model is saved in
    "OPTIMIZER_FORMAT",     # the optimiser state file's format
    "CLEAR_OPTIMIZER_STATE",  # what that file is, for the weight-file checks and messages
    "training_memory",      # the stated memory model of a distillation (estimates)
    # Several devices
    "StripePlan",           # the image's rows split into one stripe per device, with the halos each needs
    "StripeError",          # a split that cannot be made (more devices than token rows)
    "StripeLayout",         # one device's stripe of a forward pass: the layout its attention calls get
    "call_payload",         # bytes one device sends in one stripe-parallel attention call
    "Communicator",         # what devices do together: halo exchange, all-reduce, all-gather
    "ProcessGroupCommunicator",  # that, on a torch.distributed process group
    "ThreadGroup",          # that, for threads of one process (one per device)
    "MeteredCommunicator",  # a communicator that counts bytes and time
    "PeerFailed",           # another device stopped: this one stops too
]
