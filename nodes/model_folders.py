"""Model folders of the pack: ``models/clear``, ``models/gspn`` and ``models/infdit``.

Registered through ``folder_paths`` so that the loaders' file lists, ComfyUI-Manager's
model downloads and ``extra_model_paths.yaml`` entries (e.g. ``infdit: /big/disk/infdit``)
all work. The extension set is limited to weight files: a folder key created without one
would list every file, READMEs included.
"""

from __future__ import annotations

import os

import folder_paths

MODEL_FOLDERS: tuple[str, ...] = ("clear", "gspn", "infdit")


def register_model_folders() -> None:
    """Add ``<ComfyUI models dir>/<name>`` for each pack folder, keeping paths added by yaml."""
    for name in MODEL_FOLDERS:
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))
        paths, _ = folder_paths.folder_names_and_paths[name]
        folder_paths.folder_names_and_paths[name] = (paths, set(folder_paths.supported_pt_extensions))
