"""A tiny Flux-like stand-in for the core CLEAR distillation tests (no ComfyUI needed).

Double blocks (image and text streams, joint attention, the image stream's q/k/v/out
projections named like the released files) and single blocks (joint stream, q/k/v named like
the released files), over ``[text | image grid]`` tokens with a learned position embedding, so
that a window matters. Every attention projection a CLEAR file holds is read from a
``{released key: tensor}`` mapping: the teacher's own, or a student's. :class:`StandInHost`
runs it for the distillation loop: full attention for the teacher, CLEAR's for the student.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ultrares.models.clear.attention import ClearAttention, TokenLayout
from ultrares.models.clear.distill import Prediction
from ultrares.models.clear.pattern import ClearPattern
from ultrares.models.clear.weights import released_keys

HIDDEN, HEADS, CHANNELS, TEXT = 16, 2, 4, 3


class StandInFlux:
    def __init__(self, seed: int = 0, depth: int = 1, depth_single: int = 4, grid: tuple[int, int] = (6, 6),
                 prompts: int = 2):
        g = torch.Generator().manual_seed(seed)
        rand = lambda *shape, std=0.3: torch.randn(*shape, generator=g) * std  # noqa: E731
        self.depth, self.depth_single, self.grid = depth, depth_single, grid
        self.released = {key: rand(HIDDEN, HIDDEN) if key.endswith("weight") else rand(HIDDEN, std=0.05)
                         for key in released_keys(depth, depth_single, False)}
        self.frozen = {
            "img_in": rand(HIDDEN, CHANNELS, std=0.5), "pos": rand(grid[0] * grid[1], HIDDEN, std=1.0),
            "time": rand(HIDDEN), "out": rand(CHANNELS, HIDDEN, std=0.25), "prompts": rand(prompts, TEXT, HIDDEN, std=1.0),
            **{f"double.{i}.{name}": rand(HIDDEN, HIDDEN) for i in range(depth)
               for name in ("txt_q", "txt_k", "txt_v", "txt_out", "img_mlp")},
            **{f"single.{i}.out": rand(HIDDEN, HIDDEN) for i in range(depth_single)},
        }

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, prompt: int, weights: dict, attention, capture=()):
        """Velocity of latent ``x`` ``[B, CHANNELS, h, w]``; ``attention(q, k, v, block)`` on
        ``[B, heads, L, d]``; returns it and the attention outputs ``[B, L, HIDDEN]`` of ``capture``."""
        f, b = self.frozen, x.shape[0]
        img = x.flatten(2).transpose(1, 2) @ f["img_in"].T + f["pos"] + sigma * f["time"]
        txt = f["prompts"][prompt].expand(b, -1, -1)
        heads = lambda t: t.unflatten(-1, (HEADS, -1)).transpose(1, 2)  # noqa: E731
        joined = lambda t: t.transpose(1, 2).flatten(2)  # noqa: E731
        lin = lambda t, key: t @ weights[key + ".weight"].T + weights[key + ".bias"]  # noqa: E731
        for i in range(self.depth):
            a = f"transformer_blocks.{i}.attn."
            q = torch.cat([txt @ f[f"double.{i}.txt_q"].T, lin(img, a + "to_q")], 1)
            k = torch.cat([txt @ f[f"double.{i}.txt_k"].T, lin(img, a + "to_k")], 1)
            v = torch.cat([txt @ f[f"double.{i}.txt_v"].T, lin(img, a + "to_v")], 1)
            out = joined(attention(heads(q), heads(k), heads(v), ("double", i)))
            txt = txt + out[:, :TEXT] @ f[f"double.{i}.txt_out"].T
            img = img + lin(out[:, TEXT:], a + "to_out.0")
            img = img + torch.tanh(F.layer_norm(img, (HIDDEN,)) @ f[f"double.{i}.img_mlp"].T)
        tokens, captured = torch.cat([txt, img], 1), {}
        for j in range(self.depth_single):
            a = f"single_transformer_blocks.{j}.attn."
            normed = F.layer_norm(tokens, (HIDDEN,))
            q, k, v = (heads(lin(normed, a + p)) for p in ("to_q", "to_k", "to_v"))
            out = joined(attention(q, k, v, ("single", j)))
            if ("single", j) in capture:
                captured[("single", j)] = out
            tokens = tokens + out @ f[f"single.{j}.out"].T
        velocity = F.layer_norm(tokens[:, TEXT:], (HIDDEN,)) @ f["out"].T
        return velocity.transpose(1, 2).reshape(x.shape), captured


def dense(q, k, v, block):
    return F.scaled_dot_product_attention(q, k, v)


class StandInHost:
    """:class:`~ultrares.models.clear.distill.ClearDistillHost` over :class:`StandInFlux`."""

    def __init__(self, model: StandInFlux, pattern: ClearPattern, sampling_steps: int = 4, prompt_count: int = 2):
        self.model, self.pattern, self.prompt_count = model, pattern, prompt_count
        self._sigmas = torch.linspace(1, 0, sampling_steps + 1)
        self.calls = {"guided": 0, "teacher": 0, "student": 0}

    def sigmas(self):
        return self._sigmas

    def start(self, seed):
        return torch.randn(1, CHANNELS, *self.model.grid, generator=torch.Generator().manual_seed(seed))

    def guided(self, x, sigma, prompt):
        self.calls["guided"] += 1
        velocity, _ = self.model.forward(x, sigma, prompt, self.model.released, dense)
        return x - sigma * velocity

    def teacher(self, x, sigma, prompt, blocks):
        self.calls["teacher"] += 1
        return Prediction(*self.model.forward(x, sigma, prompt, self.model.released, dense, blocks))

    def student(self, x, sigma, prompt, blocks, student):
        self.calls["student"] += 1
        clear = ClearAttention(student.pattern, student.spatial_weights())
        layout = TokenLayout(self.model.grid)
        return Prediction(*self.model.forward(x, sigma, prompt, student.by_key(),
                                              lambda q, k, v, block: clear(q, k, v, layout, block), blocks))

    def window_only(self, x, sigma, prompt):
        """The teacher's weights under CLEAR's window (mean spatial weights): what a student starts as."""
        clear = ClearAttention(self.pattern)
        layout = TokenLayout(self.model.grid)
        return self.model.forward(x, sigma, prompt, self.model.released,
                                  lambda q, k, v, block: clear(q, k, v, layout, block))[0]
