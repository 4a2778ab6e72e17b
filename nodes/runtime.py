"""What a running node shows the user, and its cancel button, handed to host-free code as plain
callables.

The core (``kernels/``, ``models/``) takes ``on_progress(done, total)`` and ``check_interrupt()``
callbacks instead of importing ComfyUI; nodes build them here. A long job also gets a
:class:`NodeFeedback`: ComfyUI's progress bar, a preview image on it, and a few lines of text
under the node.

- Text: ``PromptServer.instance.send_progress_text(text, node_id)`` (``server.py``, the same on
  0.3.64 and the 0.38 line; the frontend shows the latest text in the node), for the node that
  is running (``comfy_execution.utils.get_executing_context``). Each message replaces the last,
  so every update carries the whole text. Where the host has neither (an older host, or code
  run outside a prompt), the text goes to the log only.
- Preview: ``ProgressBar.update_absolute(value, total, ("JPEG", image, max size))``, the path
  ComfyUI's own sampler previews take (``latent_preview.py``); newer ``comfy/utils.py`` sends an
  update with a preview at once, bypassing its throttle, so previews are throttled here. They
  follow ComfyUI's preview setting (``--preview-method``, which newer frontends set per prompt):
  ``none`` shows none.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

import comfy.model_management
import comfy.utils
import torch

PREVIEW_SECONDS = 1.0
"""Shortest time between two previews."""
TEXT_SECONDS = 0.25
"""Shortest time between two progress texts (the first and the last are always sent)."""
ESTIMATE_AFTER_SECONDS = 5.0
"""Time left is estimated once the job has run this long."""


def progress_callback(total: int) -> Callable[[int, int], None]:
    """A ``(done, total)`` callback that drives the node's progress bar in the UI."""
    bar = comfy.utils.ProgressBar(total)

    def on_progress(done: int, new_total: int) -> None:
        bar.update_absolute(done, new_total)

    return on_progress


def check_interrupt() -> None:
    """Raise ComfyUI's ``InterruptProcessingException`` if the user pressed cancel."""
    comfy.model_management.throw_exception_if_processing_interrupted()


def running_node_id() -> str | None:
    """The id of the node ComfyUI is running (None outside a prompt, or on hosts without it)."""
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None
    context = get_executing_context()
    return None if context is None else context.node_id


def _prompt_server():
    """ComfyUI's running server (``server.py`` is imported by ``main.py``; not imported here)."""
    module = sys.modules.get("server")
    prompt_server = getattr(module, "PromptServer", None)
    return getattr(prompt_server, "instance", None)


def send_progress_text(text: str, node_id: str | None = None) -> bool:
    """Show ``text`` under the running node (or ``node_id``); False where the host cannot."""
    node_id = node_id if node_id is not None else running_node_id()
    send = getattr(_prompt_server(), "send_progress_text", None)
    if node_id is None or send is None:
        return False
    send(text, node_id)
    return True


def previews_enabled() -> bool:
    """Whether ComfyUI shows previews (its ``--preview-method``, per prompt on newer hosts)."""
    from comfy.cli_args import LatentPreviewMethod, args

    return args.preview_method != LatentPreviewMethod.NoPreviews


def preview_size() -> int:
    """The longest side of previews ComfyUI sends (``--preview-size``)."""
    from comfy.cli_args import args

    return int(getattr(args, "preview_size", 512) or 512)


def duration_text(seconds: float) -> str:
    """``"40 s"``, ``"3 min"``, ``"1 h 20 min"``."""
    seconds = max(seconds, 0.0)
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


class NodeFeedback:
    """The progress bar, preview and text of one node's run, and its log lines.

    ``announce`` sets the lines that stay on top (the plan) and logs them; ``status`` updates the
    line under them (where the job is, and the time left once it can be estimated);
    ``progress`` moves the bar, with a preview now and then; ``finish`` says how it ended.
    """

    def __init__(self, name: str, logger: logging.Logger | None = None):
        self.name, self.log = name, logger or logging.getLogger(__name__)
        self.node_id = running_node_id()
        self.header = ""
        self.started = time.monotonic()
        self._bar: comfy.utils.ProgressBar | None = None
        self._text_at = self._preview_at = float("-inf")
        self._done, self._total = 0, 1
        self._show_previews = previews_enabled()
        self.preview_side = preview_size()

    @property
    def wants_previews(self) -> bool:
        return self._show_previews

    def _send(self, text: str) -> None:
        send_progress_text(text, self.node_id)
        self._text_at = time.monotonic()

    def announce(self, text: str, level: int = logging.INFO) -> None:
        """Lines that stay on top of the node's text from now on; also logged."""
        self.header = text
        for line in text.splitlines():
            self.log.log(level, "%s: %s", self.name, line)
        self._send(text)

    def remaining(self, done: int, total: int) -> str | None:
        """``"about 3 min left"`` once enough has run to tell, else None."""
        elapsed = time.monotonic() - self.started
        if done <= 0 or done >= total or elapsed < ESTIMATE_AFTER_SECONDS:
            return None
        return f"about {duration_text(elapsed / done * (total - done))} left"

    def status(self, text: str, done: int, total: int) -> None:
        """The line under the header: where the job is (sent at most every :data:`TEXT_SECONDS`,
        the last one always)."""
        if done < total and time.monotonic() - self._text_at < TEXT_SECONDS:
            return
        left = self.remaining(done, total)
        line = f"{text} · {left}" if left else text
        self._send(f"{self.header}\n{line}" if self.header else line)

    def progress(self, done: int, total: int, preview: torch.Tensor | Callable[[], torch.Tensor | None] | None = None
                 ) -> None:
        """Move the progress bar; ``preview`` (``[h, w, 3]`` uint8, or a callable giving it) goes
        with it at most every :data:`PREVIEW_SECONDS` and at the end, when previews are on."""
        if self._bar is None:
            self._bar = comfy.utils.ProgressBar(total)
        self._done, self._total = done, total
        picture = None
        now = time.monotonic()
        if preview is not None and self._show_previews and (now - self._preview_at >= PREVIEW_SECONDS or done >= total):
            pixels = preview() if callable(preview) else preview
            if pixels is not None:
                picture = self._picture(pixels)
                self._preview_at = now
        self._bar.update_absolute(done, total, picture)

    def show_preview(self, pixels: torch.Tensor) -> None:
        """A new preview at the bar's current position (throttled like :meth:`progress`)."""
        self.progress(self._done, self._total, pixels)

    def _picture(self, pixels: torch.Tensor) -> tuple:
        from PIL import Image

        # A copy: the server encodes it later, on its own thread, while the job paints on.
        return "JPEG", Image.fromarray(pixels.clone().numpy()), self.preview_side

    def finish(self, text: str, logged: bool = True) -> None:
        """How the job ended, under the header (also logged unless ``logged`` is False: said already)."""
        if logged:
            self.log.info("%s: %s", self.name, text)
        self._send(f"{self.header}\n{text}" if self.header else text)

    def elapsed(self) -> str:
        return duration_text(time.monotonic() - self.started)
