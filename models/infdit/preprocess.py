"""Image resizing, padding and the CLIP view, matching the reference's torchvision transforms.

The reference resizes float tensors with torchvision (bicubic, antialias on, the default
since torchvision 0.17), i.e. PyTorch's separable antialiased bicubic kernel, also when
upsampling. Images here are ``[B, C, H, W]`` floats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_bicubic(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """torchvision's tensor ``resize(..., BICUBIC, antialias=True)``."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image, size=size, mode="bicubic", align_corners=False, antialias=True)


def pad_to_multiple(image: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad bottom and right to whole multiples, mirroring the border (replicating it when
    the image is too small to mirror), so the model sees plausible content there."""
    height, width = image.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if not pad_h and not pad_w:
        return image
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(image, (0, pad_w, 0, pad_h), mode=mode)


def clip_view(image: torch.Tensor, size: int) -> torch.Tensor:
    """The reference's CLIP preprocessing of an image in [-1, 1]: to [0, 1], resize the shorter
    side to ``size`` (bicubic), centre-crop ``size`` x ``size``, normalise with CLIP's mean/std."""
    x = (image + 1) / 2
    height, width = x.shape[-2:]
    short, long = min(height, width), max(height, width)
    new_long = int(size * long / short)
    x = resize_bicubic(x, (size, new_long) if height <= width else (new_long, size))
    height, width = x.shape[-2:]
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(OPENAI_CLIP_MEAN, dtype=x.dtype, device=x.device)[:, None, None]
    std = torch.tensor(OPENAI_CLIP_STD, dtype=x.dtype, device=x.device)[:, None, None]
    return (x - mean) / std
