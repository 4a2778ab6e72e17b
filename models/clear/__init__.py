"""CLEAR for FLUX, host-free: the pattern settings of a released file, the down-sampled key
branch, the released files' key layout and its mapping onto a Flux, and the per-call attention
that ties them to :func:`ultrares.kernels.clear_attention.circular_window_attention`; for
several devices, the image's stripes and halos (``stripes``), the steps devices take together
(``communicator``: torch.distributed or threads of one process) and the exact stripe-parallel
attention call (``parallel``).

The node (``nodes/clear/``) reads a file with :func:`read_clear_file`, checks it against the
model with :func:`plan_weights`, picks the window with :func:`resolve_pattern` and runs
:class:`ClearAttention` from its attention override.
"""

from ...kernels import BACKENDS, Backend
from .attention import ClearAttention, TokenLayout
from .communicator import Communicator, MeteredCommunicator, PeerFailed, ProcessGroupCommunicator, ThreadGroup
from .parallel import StripeLayout, call_payload
from .pattern import ClearPattern, ntk_theta, resolve_pattern, softmax_scale
from .stripes import StripeError, StripePlan
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
