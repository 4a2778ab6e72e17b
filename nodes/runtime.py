"""ComfyUI's progress bar and cancel button, handed to host-free code as plain callables.

The core (``kernels/``, ``models/``) takes ``on_progress(done, total)`` and ``check_interrupt()``
callbacks instead of importing ComfyUI; nodes build them here.
"""

from __future__ import annotations

from collections.abc import Callable

import comfy.model_management
import comfy.utils


def progress_callback(total: int) -> Callable[[int, int], None]:
    """A ``(done, total)`` callback that drives the node's progress bar in the UI."""
    bar = comfy.utils.ProgressBar(total)

    def on_progress(done: int, new_total: int) -> None:
        bar.update_absolute(done, new_total)

    return on_progress


def check_interrupt() -> None:
    """Raise ComfyUI's ``InterruptProcessingException`` if the user pressed cancel."""
    comfy.model_management.throw_exception_if_processing_interrupted()
