"""Host-free networks, weight files and key mappings. Never imports ComfyUI.

One subpackage per method (``clear``, ``gspn``, ``infdit``), each stating its API; shared by
all three, :mod:`.weight_files` opens every weight file the pack reads (refusing broken ones
and other kinds of model by name, with what to do) and writes them atomically.
"""

from .weight_files import (FileKind, WeightFileError, identify, key_sections, read_weights, save_safetensors,
                           write_atomically)

__all__ = [
    # Weight files, for every loader and writer
    "FileKind",             # what one loader reads: its name, error type, formats and remedy
    "read_weights",         # a file of a kind -> tensors and metadata, broken files refused by name
    "identify",             # which kind of model file a key set is (a FLUX LoRA, a VAE ...)
    "key_sections",         # missing / unexpected / misshapen keys, in the one wording
    "WeightFileError",      # the base of every loader's error type
    "save_safetensors",     # tensors -> a safetensors file, atomically
    "write_atomically",     # a temporary path that replaces the file in one step
]
