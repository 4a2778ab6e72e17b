"""What an upscale tells whoever watches it while it runs: where it is, in counts a user can
read (:class:`UpscaleStep`), and a small picture of the image being built (:class:`PreviewCanvas`).

The picture is the upscale's current prediction of the finished image, block batch by block
batch: it starts as the bicubic-upsampled input the model refines, and every batch paints the
blocks it just denoised (the network's estimate of the clean image at that noise level, what
ComfyUI's sampler previews show for latents). It is downsampled by a power of two that divides
the block size, so every batch covers whole preview pixels. Painting only reads the sampler's
buffers: the result is the same with or without a preview.

With several ranks each rank paints its own band (the rest of its picture stays the upsampled
input); :func:`encode_piece` packs a rank's band for the rendezvous store and a
:class:`PreviewMosaic` on the host puts the ranks' pieces together.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PREVIEW_SIDE = 512
"""The longest side a preview aims for (ComfyUI's default ``--preview-size``)."""


@dataclass(frozen=True)
class UpscaleStep:
    """Where an upscale is after a block batch; the counts are 1-based, of this rank with several."""

    done: int
    """Block batches finished in the whole upscale."""
    total: int
    image: int
    images: int
    stage: int
    """The 2x/4x pass (8x = a 4x then a 2x pass)."""
    stages: int
    factor: int
    evaluation: int
    """Network evaluation of this image's pass (a Heun solve of ``steps`` takes ``2 steps - 1``)."""
    evaluations: int
    batch: int
    """Block batch of this evaluation."""
    batches: int

    def describe(self) -> str:
        """``"image 1/2 · pass 2/2 (4×) · evaluation 12/39 · batch 3/16"`` (image and pass only when
        there are several)."""
        parts = []
        if self.images > 1:
            parts.append(f"image {self.image}/{self.images}")
        if self.stages > 1:
            parts.append(f"pass {self.stage}/{self.stages} ({self.factor}×)")
        parts += [f"evaluation {self.evaluation}/{self.evaluations}", f"batch {self.batch}/{self.batches}"]
        return " · ".join(parts)


def preview_factor(height: int, width: int, block_px: int, side: int = PREVIEW_SIDE) -> int:
    """The downsampling factor of a preview of a ``height x width`` (whole blocks) output: the
    smallest power of two that brings the longer side to ``side`` or below, at most ``block_px``
    (a batch then always covers whole preview pixels)."""
    factor = 1
    while max(height, width) > side * factor and factor * 2 <= block_px and block_px % (factor * 2) == 0:
        factor *= 2
    return factor


class PreviewCanvas:
    """A small RGB picture (uint8, on the host) of one stage's output while it is sampled.

    ``start(lr, size)`` sets it to the upsampled input ``lr`` (``[1, 3, H, W]`` in [-1, 1], whole
    blocks) of an output cropped to ``size`` later; ``paint(pixels, top, left)`` puts a region of
    the current prediction (``[1, 3, h, w]`` at image pixel ``(top, left)``) in; ``image()`` is
    the picture cropped to the output, ``[h, w, 3]`` uint8.
    """

    def __init__(self, block_px: int, side: int = PREVIEW_SIDE):
        self.block_px, self.side = block_px, side
        self.factor = 1
        self.pixels: torch.Tensor | None = None
        self.size = (0, 0)
        self.own: tuple[int, int, int, int] = (0, 0, 0, 0)
        """The image region ``(top, left, height, width)`` this process paints (its band)."""
        self.stage = 0
        """Stages started, the same count on every rank."""
        self.version = 0
        """Counts the changes, so a watcher can tell whether the picture moved on."""

    def _shrink(self, image: torch.Tensor) -> torch.Tensor:
        rgb = image[:1, :3].float()
        if self.factor > 1:
            rgb = F.avg_pool2d(rgb, self.factor)
        return ((rgb[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu()

    def start(self, lr: torch.Tensor, size: tuple[int, int], own: tuple[int, int, int, int] | None = None) -> None:
        """A new stage: the picture is its upsampled input, for an output cropped to ``size``;
        ``own``: the region this process paints (default: all of it)."""
        self.factor = preview_factor(lr.shape[-2], lr.shape[-1], self.block_px, self.side)
        self.pixels = self._shrink(lr)
        self.size = size
        self.own = own if own is not None else (0, 0, lr.shape[-2], lr.shape[-1])
        self.stage += 1
        self.version += 1

    def paint(self, pixels: torch.Tensor, top: int, left: int) -> None:
        """Put a region of the prediction (whole blocks, at image pixel ``(top, left)``) in."""
        if self.pixels is None:
            return
        f = self.factor
        small = self._shrink(pixels)
        self.pixels[top // f:top // f + small.shape[0], left // f:left // f + small.shape[1]] = small
        self.version += 1

    def region(self, top: int, left: int, height: int, width: int) -> torch.Tensor:
        """The picture's pixels under an image region (whole blocks), ``[h, w, 3]`` uint8."""
        f = self.factor
        return self.pixels[top // f:(top + height) // f, left // f:(left + width) // f]

    def image(self) -> torch.Tensor | None:
        """The picture cropped to the output, ``[h, w, 3]`` uint8 (None before the first stage)."""
        if self.pixels is None:
            return None
        f = self.factor
        return self.pixels[:-(-self.size[0] // f), :-(-self.size[1] // f)]


def encode_piece(canvas: PreviewCanvas) -> bytes:
    """The canvas's own region as bytes: a JSON line (stage, sizes and box, in preview pixels),
    then the region's uint8 RGB values."""
    f = canvas.factor
    top, left, height, width = canvas.own
    pixels = canvas.region(top, left, height, width).contiguous()
    header = {"stage": canvas.stage, "shape": list(canvas.pixels.shape[:2]),
              "crop": [-(-canvas.size[0] // f), -(-canvas.size[1] // f)],
              "box": [top // f, left // f, pixels.shape[0], pixels.shape[1]]}
    return json.dumps(header).encode() + b"\n" + pixels.numpy().tobytes()


class PreviewMosaic:
    """The whole picture from the ranks' pieces (:func:`encode_piece`), on the host."""

    def __init__(self) -> None:
        self.stage = -1
        self.pixels: torch.Tensor | None = None
        self.crop = (0, 0)

    def put(self, piece: bytes) -> None:
        """Paste one rank's piece; a piece of a later stage starts a new picture."""
        line, _, data = piece.partition(b"\n")
        header = json.loads(line)
        if header["stage"] < self.stage:
            return
        shape = tuple(header["shape"])
        if header["stage"] > self.stage or self.pixels is None or tuple(self.pixels.shape[:2]) != shape:
            self.stage, self.pixels = header["stage"], torch.zeros(shape + (3,), dtype=torch.uint8)
        self.crop = tuple(header["crop"])
        top, left, height, width = header["box"]
        values = torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(height, width, 3)
        self.pixels[top:top + height, left:left + width] = values

    def image(self) -> torch.Tensor | None:
        """The picture so far, ``[h, w, 3]`` uint8 (None before any piece)."""
        return None if self.pixels is None else self.pixels[:self.crop[0], :self.crop[1]]
