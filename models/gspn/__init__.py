"""GSPN for SD1.5/SDXL: propagation modules that stand in for the UNet's self-attention
(``attn1``), their weight files, and the distillation that makes those weights from the
model they will replace (no text-to-image GSPN weights are public).

The nodes (``nodes/gspn/``) find the layers with :func:`find_attn1_layers`, load a file
with :func:`load_gspn_weights` and drive :func:`distill` through a :class:`DistillHost` of
their own; ``cli/gspn_distill.py`` does the same.
"""

from .distill import Capture, DistillHost, DistillSettings, distill
from .layers import GSPNConfig, GSPNLayers, LayerSpec, find_attn1_layers
from ..training import draw_loss_plot
from .module import GSPNAttention, Operations
from .optimizer_state import load_optimizer_state, make_optimizer, optimizer_path, save_optimizer_state
from .weights import GSPN_WEIGHTS, GSPNWeightsError, TrainingRecord, load_gspn_weights, save_gspn_weights

__all__ = [
    # Layers and modules
    "LayerSpec",            # one UNet self-attention layer: module path, patch key, width, level
    "find_attn1_layers",    # a UNet -> its self-attention layers
    "GSPNConfig",           # scan chunk and proxy ratio of every module
    "GSPNAttention",        # one GSPN layer in place of an attn1
    "GSPNLayers",           # one GSPNAttention per host layer
    "Operations",           # the layer classes modules are built from (torch.nn, comfy.ops ...)
    # Weight files
    "save_gspn_weights",    # modules + family + training record -> a safetensors file (atomic)
    "load_gspn_weights",    # a file -> modules and record, checked against a model
    "TrainingRecord",       # steps, losses and settings of the distillation so far
    "GSPNWeightsError",     # a GSPN file the loader refuses, with the reason and what to do
    "GSPN_WEIGHTS",         # what a GSPN file is, for the weight-file checks and messages
    # Distillation
    "DistillHost",          # what the loop needs from the model being distilled
    "Capture",              # one captured attn1 call: q, k, v, output, map size
    "DistillSettings",      # steps, learning rate, prediction weight, seed, save interval
    "distill",              # train the modules on the teacher's own trajectories
    "make_optimizer",       # the distillation's AdamW
    "optimizer_path",       # where a weight file's optimizer state lives
    "save_optimizer_state", # the optimizer's state beside the weights, for resuming
    "load_optimizer_state", # restore it onto the weights it was saved with
    "draw_loss_plot",       # the loss curves as an RGB image
]
