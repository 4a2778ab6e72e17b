"""An independent whole-image Inf-DiT, written from the released "full" inference path.

The exactness tests compare the block scheduler with this, so nothing here uses the
scheduler's pieces (batch plans, neighbour cache, extended grids, LR tiles, per-batch RoPE
positions, the in-place Heun buffers, the chunked noise draw). It shares only the per-token
network maths (``net.layer`` with a gather callback, ``net.embed``, ``net.output``), which
``test_infdit_network.py`` checks against the reference formulas, and the CLIP tower and its
preprocessing (``test_infdit_clip.py``, and against torchvision in the ComfyUI tests).

- evaluation: token positions from the token index wrapped at the table size, cos and sin
  looked up in ``[period, period, head_dim]`` tables as ``RotaryPositionEmbedding`` does (the
  tables it is fed, or ones built as its ``__init__`` builds them), the clamp-and-concatenate
  neighbour gather of ``get_cat_layer_left_top``, LR windows from ``nn.Unfold`` after ``proj_lr``;
- sampling: ``ConcatSRHeunEDMSampler`` (EDM Algorithm 1 without churn) over
  ``EDMDiscretization`` sigmas, noise for the whole image in one draw.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import to_blocks
from .preprocess import clip_view


def reference_rope_table(period: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``RotaryPositionEmbedding(pix2struct=True)``'s fp32 tables ``[period, period, head_dim]``:
    per axis, frequencies repeated in adjacent pairs; rows first, then columns."""
    half = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    t = torch.arange(period) / period * period
    axis = torch.einsum("i,f->if", t, freqs).repeat_interleave(2, dim=-1)
    table = torch.cat([axis[:, None, :].expand(-1, period, -1), axis[None, :, :].expand(period, -1, -1)], dim=-1)
    return table.cos(), table.sin()


def full_table(diagonal: torch.Tensor) -> torch.Tensor:
    """The reference's ``[period, period, head_dim]`` layout of a table diagonal (the network keeps
    the diagonal, :func:`.attention.table_diagonal`): row part at the row, column part at the column."""
    period, half = diagonal.shape[0], diagonal.shape[1] // 2
    return torch.cat([diagonal[:, None, :half].expand(-1, period, -1),
                      diagonal[None, :, half:].expand(period, -1, -1)], dim=-1)


def reference_gather(x: torch.Tensor) -> torch.Tensor:
    """The released full-mode gather: pad with the first row/column, then [self, TL, L, T]."""
    rows, cols = x.shape[1:3]
    padded = torch.cat([x[:, :1], x], dim=1)
    padded = torch.cat([padded[:, :, :1], padded], dim=2)
    return torch.cat([x, padded[:, :rows, :cols], padded[:, 1:, :cols], padded[:, :rows, 1:]], dim=3)


def reference_lr_windows(net, lr_image: torch.Tensor) -> torch.Tensor:
    """proj_lr, nn.Unfold(3 lb, stride lb, padding lb), then keys/values per window token."""
    cfg, lb = net.cfg, net.cfg.lr_block
    features = net.lr_xattn.proj_lr(lr_image)
    unfolded = torch.nn.Unfold(kernel_size=3 * lb, stride=lb, padding=lb)(features)
    b, _, windows = unfolded.shape
    tokens = unfolded.view(b, cfg.hidden, 3 * lb, 3 * lb, windows).permute(0, 4, 2, 3, 1).flatten(2, 3)
    rows, cols = lr_image.shape[-2] // (lb * cfg.lr_patch), lr_image.shape[-1] // (lb * cfg.lr_patch)
    return net.lr_xattn.token_key_values(tokens).view(b, rows, cols, *tokens.shape[2:3], 2, cfg.heads, -1)


def reference_preconditioning(sigma: float) -> tuple[float, float, float, float]:
    """``EDMPrecond`` with sigma_data = 0.5."""
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    c_out = sigma * 0.5 / (sigma ** 2 + 0.25) ** 0.5
    c_in = 1 / (sigma ** 2 + 0.25) ** 0.5
    return c_skip, c_out, c_in, 0.25 * torch.log(torch.tensor(sigma, dtype=torch.float64)).item()


def reference_evaluation(net, x, sigma, concat_lr, lr_image, vector, rope_tables=None) -> torch.Tensor:
    """One denoiser evaluation D(x; sigma) of the whole image at once.

    ``rope_tables``: the ``[period, period, head_dim]`` cos and sin tables, cast to the model
    dtype as the reference casts its buffers (default: built as a new reference model builds them).
    D is formed in fp32 from the network output, as the pack's sampler does (the release's
    sampler runs in bf16), so that a half-precision model is compared on its network alone.
    """
    cfg = net.cfg
    c_skip, c_out, c_in, c_noise = reference_preconditioning(sigma)
    cond = net.conditioning(torch.full((x.shape[0],), c_noise), vector)
    h = net.embed(torch.cat([x, concat_lr], dim=1) * c_in)
    rows_t, cols_t = x.shape[-2] // cfg.patch, x.shape[-1] // cfg.patch
    index = torch.arange(rows_t * cols_t)
    if rope_tables is None:
        rope_tables = reference_rope_table(cfg.rope_period, cfg.head_dim)
    cos_table, sin_table = rope_tables
    period = cos_table.shape[0]
    rows, cols = index // cols_t % period, index % cols_t % period
    cos, sin = cos_table.to(net.dtype)[rows, cols], sin_table.to(net.dtype)[rows, cols]
    cos, sin = (to_blocks(t.T.reshape(1, -1, rows_t, cols_t), cfg.block)[0][..., None, :] for t in (cos, sin))
    windows = reference_lr_windows(net, lr_image)
    for layer in range(cfg.layers):
        h = net.layer(layer, h, cond, cos, sin, lambda _, k, v: (reference_gather(k), reference_gather(v)),
                      windows if layer == 0 else None)
    return c_skip * x + c_out * net.output(h, cond).float()


def reference_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 40.0, rho: float = 7.0) -> list[float]:
    """``EDMDiscretization`` (fp32, as the reference computes it) with the appended zero."""
    ramp = torch.linspace(0, 1, steps)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return sigmas.tolist() + [0.0]


def reference_heun(denoise, x: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """``ConcatSRHeunEDMSampler`` without churn: Euler step, Heun correction unless sigma' = 0."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - denoise(x, sigma)) / sigma
        euler = x + (sigma_next - sigma) * d
        if sigma_next == 0:
            x = euler
        else:
            d_new = (euler - denoise(euler, sigma_next)) / sigma_next
            x = x + (sigma_next - sigma) * (d + d_new) / 2
    return x


def reference_upscale_4x(weights, image: torch.Tensor, steps: int, seed: int, init_noise: bool) -> torch.Tensor:
    """A 4x sample of one ``[1, 3, h, w]`` image in [0, 1] whose output is whole blocks.

    As the reference script: the bicubic (antialiased, torchvision's tensor resize) 4x image
    clipped to [-1, 1] is concatenated, the input itself feeds the LR cross-attention and CLIP,
    x_T = LR + 40 N(0, I) with init-noise (else 40 N(0, I)).
    """
    net = weights.net
    lr = image * 2 - 1
    concat_lr = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)
    vector = weights.clip.encode(clip_view(lr, weights.clip.cfg.image_size))
    noise = torch.randn(concat_lr.shape, generator=torch.Generator().manual_seed(seed)) * 40.0
    x = concat_lr + noise if init_noise else noise
    with torch.inference_mode():
        x = reference_heun(lambda x, sigma: reference_evaluation(net, x, sigma, concat_lr, lr, vector), x,
                           reference_sigmas(steps))
    return (x.clamp(-1, 1) + 1) / 2
