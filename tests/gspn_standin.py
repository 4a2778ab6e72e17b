"""A tiny UNet-like stand-in for SD1.5 in the core GSPN tests (no ComfyUI needed).

It has the module layout GSPN looks for (``input_blocks.<i>.<j>.transformer_blocks.<t>.attn1``,
Downsample/Upsample blocks, skip connections, cross-attention to a context) and lets every
``attn1`` be replaced by a function of ``(q, k, v, height, width)``, the way ComfyUI's
``attn1`` replace hook does. :class:`StandInHost` runs it for the distillation loop, and
:func:`held_out_loss` measures what a distillation learnt (on any host, ComfyUI's too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ultrares.models.gspn import GSPNLayers
from ultrares.models.gspn.distill import Capture, DistillHost, layer_matching_loss, trajectory_points

CONTEXT_DIM = 12


@dataclass
class Options:
    replace: dict = field(default_factory=dict)   # attn1 module path -> fn(q, k, v, height, width)


def attention(q, k, v, heads):
    n, tokens, dim = q.shape
    split = lambda t: t.view(n, -1, heads, dim // heads).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(n, tokens, dim)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, context_dim: int | None = None, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))
        self.layer_name = ""

    def forward(self, x, grid, options: Options, context=None):
        source = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(source), self.to_v(source)
        replace = options.replace.get(self.layer_name) if context is None else None
        out = replace(q, k, v, *grid) if replace is not None else attention(q, k, v, self.heads)
        return self.to_out(out)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim)
        self.attn2 = CrossAttention(dim, CONTEXT_DIM)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, context, grid, options):
        x = x + self.attn1(self.norm1(x), grid, options)
        x = x + self.attn2(self.norm2(x), grid, options, context=context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(4, dim)
        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(dim)])
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x, emb, context, options):
        n, c, h, w = x.shape
        t = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            t = block(t, context, (h, w), options)
        return x + self.proj_out(t.transpose(1, 2).reshape(n, c, h, w))


class ResBlock(nn.Module):
    def __init__(self, channels: int, out_channels: int, emb_dim: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(4, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, 1, 1))
        self.emb_layers = nn.Linear(emb_dim, out_channels)
        self.out_layers = nn.Sequential(nn.GroupNorm(4, out_channels), nn.SiLU(),
                                        nn.Conv2d(out_channels, out_channels, 3, 1, 1))
        self.skip = nn.Conv2d(channels, out_channels, 1) if channels != out_channels else nn.Identity()

    def forward(self, x, emb, context, options):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, 2, 1)

    def forward(self, x, emb, context, options):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x, emb, context, options):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Sequential(nn.ModuleList):
    def forward(self, x, emb, context, options):
        for layer in self:
            x = layer(x, emb, context, options)
        return x


class Conv(nn.Conv2d):
    def forward(self, x, emb, context, options):
        return super().forward(x)


class TinyUNet(nn.Module):
    """Two levels (16 and 32 channels); attn1 at level 0 on the way down, in the middle (level 1)
    and at both levels on the way up: four layers."""

    def __init__(self, seed: int = 0, ch: int = 16):
        super().__init__()
        torch.manual_seed(seed)
        emb = 4 * ch
        self.time_embed = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input_blocks = nn.ModuleList([
            Sequential([Conv(4, ch, 3, 1, 1)]),
            Sequential([ResBlock(ch, ch, emb), SpatialTransformer(ch)]),
            Sequential([Downsample(ch)]),
            Sequential([ResBlock(ch, 2 * ch, emb)]),
        ])
        self.middle_block = Sequential([ResBlock(2 * ch, 2 * ch, emb), SpatialTransformer(2 * ch),
                                        ResBlock(2 * ch, 2 * ch, emb)])
        self.output_blocks = nn.ModuleList([
            Sequential([ResBlock(4 * ch, 2 * ch, emb)]),
            Sequential([ResBlock(3 * ch, 2 * ch, emb), SpatialTransformer(2 * ch), Upsample(2 * ch)]),
            Sequential([ResBlock(3 * ch, ch, emb)]),
            Sequential([ResBlock(2 * ch, ch, emb), SpatialTransformer(ch)]),
        ])
        self.out = nn.Sequential(nn.GroupNorm(4, ch), nn.SiLU(), nn.Conv2d(ch, 4, 3, 1, 1))
        self.ch = ch
        for name, module in self.named_modules():
            if isinstance(module, CrossAttention):
                module.layer_name = name
                # Sharper attention than the default init gives: content-dependent mixing.
                module.to_q.weight.data.mul_(4.0)
                module.to_k.weight.data.mul_(4.0)
        self.requires_grad_(False)

    def forward(self, x, sigma, context, options: Options | None = None):
        options = options or Options()
        half = self.ch // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half) / half)
        angles = torch.log(sigma.reshape(-1, 1)).expand(x.shape[0], 1) * 250 * freqs
        emb = self.time_embed(torch.cat([angles.sin(), angles.cos()], dim=1))
        h, skips = x / torch.sqrt(sigma ** 2 + 1), []
        for block in self.input_blocks:
            h = block(h, emb, context, options)
            skips.append(h)
        h = self.middle_block(h, emb, context, options)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, options)
        eps = self.out(h)
        return x - sigma * eps


class StandInHost:
    """:class:`DistillHost` for :class:`TinyUNet`: Euler trajectories over ``sampling_steps`` steps."""

    def __init__(self, model: TinyUNet, prompts: int = 2, latent_shape=(1, 4, 8, 12), sampling_steps: int = 4,
                 seed: int = 0):
        self.model = model
        generator = torch.Generator().manual_seed(seed)
        self.contexts = [torch.randn(latent_shape[0], 3, CONTEXT_DIM, generator=generator) for _ in range(prompts)]
        self.prompt_count = prompts
        self.latent_shape = latent_shape
        self.sampling_steps = sampling_steps

    def sigmas(self) -> torch.Tensor:
        return torch.cat([torch.exp(torch.linspace(math.log(8.0), math.log(0.1), self.sampling_steps)),
                          torch.zeros(1)])

    def start(self, seed: int) -> torch.Tensor:
        return torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(seed)) * self.sigmas()[0]

    def teacher(self, x, sigma, prompt):
        captures = {}

        def capturing(name, heads):
            def replace(q, k, v, height, width):
                out = attention(q, k, v, heads)
                captures[name] = Capture(q, k, v, out, height, width)
                return out
            return replace

        replace = {name: capturing(name, m.heads) for name, m in self.model.named_modules()
                   if isinstance(m, CrossAttention)}
        with torch.no_grad():
            denoised = self.model(x, sigma, self.contexts[prompt], Options(replace=replace))
        return denoised, captures

    def student(self, x, sigma, prompt, gspn):
        replace = {spec.name: module for spec, module in gspn.items()}
        return self.model(x, sigma, self.contexts[prompt], Options(replace=replace))


def held_out_loss(gspn: GSPNLayers, host: DistillHost, points: int, seed: int) -> float:
    """Mean layer-matching loss of ``gspn`` over the first ``points`` trajectory points from ``seed``."""
    with torch.no_grad():
        losses = [layer_matching_loss(gspn, p.captures).item()
                  for _, p in zip(range(points), trajectory_points(host, seed))]
    return sum(losses) / len(losses)
