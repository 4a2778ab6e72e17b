"""What every distillation of the pack shares, host-free: the optimisation loop (progress,
interruption, periodic and cancel saves), the teacher's Euler sampler, the optimiser state kept
beside a weight file for resuming, AdamW with its state in host memory, and the loss curve.

Each method brings its own step (data, losses, backward) and weight file: GSPN
(``models/gspn/distill.py``) and CLEAR (``models/clear/distill.py``).
"""

from .loop import TOTAL, Record, Step, train
from .loss_plot import draw_loss_plot
from .offload import OffloadedAdamW
from .optimizer_state import load_optimizer_state, optimizer_path, save_optimizer_state
from .sampling import euler_sample, euler_step

__all__ = [
    "train",                 # the loop: steps, clipping, record, progress, interruption, saves
    "Step",                  # one step's work for the loop: back-propagate, return the loss terms
    "Record",                # what the loop updates in a method's training record
    "TOTAL",                 # the name of the optimised total among a step's loss terms
    "euler_step",            # one Euler step of the teacher's sampler
    "euler_sample",          # a whole Euler trajectory -> the teacher's sample
    "optimizer_path",        # where a weight file's optimiser state lives
    "save_optimizer_state",  # the optimiser's state beside the weights, for resuming
    "load_optimizer_state",  # restore it onto the weights it was saved with
    "OffloadedAdamW",        # AdamW with its float32 state in host memory (device: compute-dtype values only)
    "draw_loss_plot",        # loss curves as an RGB image
]
