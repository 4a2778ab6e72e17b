"""Inf-DiT weights in the released file layout, for the loader's and the nodes' tests.

:func:`released_state_dict` names a model's tensors as the release's ``['module']`` does
(SwissArmyTransformer names, plus the tensors the release carries but never reads), and
:func:`save_released_layout` saves them the way DeepSpeed saved ``mp_rank_00_model_states.pt``:
under ``['module']``, with the client state (including a numpy RNG state) beside them. The
RoPE tables are bf16 buffers, as in the release (built in fp32, then cast with the bf16 model).
"""

from __future__ import annotations

import random
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from ultrares.models.infdit._full_reference import full_table
from ultrares.models.infdit.checkpoint import ROPE_TABLES, SAT_BLOCK_BIAS, SAT_CLIP_PREFIX, InfDiTWeights, sat_name


def pack_to_sat(dit: dict[str, torch.Tensor], clip: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The inverse of the loader's naming (pack -> SAT): the blocks' biases stacked, the RoPE
    tables whole, every other key under the released name the loader's messages use."""
    state: dict[str, torch.Tensor] = {}
    biases = {}
    for key, value in dit.items():
        if match := re.fullmatch(r"blocks\.(\d+)\.block_bias", key):
            biases[int(match.group(1))] = value
        elif key in ROPE_TABLES:
            state[ROPE_TABLES[key]] = full_table(value)
        else:
            state[sat_name(key)] = value
    if biases:
        state[SAT_BLOCK_BIAS] = torch.stack([biases[i] for i in range(len(biases))])
    state.update({SAT_CLIP_PREFIX + key: value for key, value in (clip or {}).items()})
    return state


def released_state_dict(weights: InfDiTWeights, seed: int = 0) -> dict[str, torch.Tensor]:
    """``['module']`` of the release for these weights: SAT names plus the tensors it ignores,
    the RoPE tables (the network's own, whole) in bf16 whatever the weights' dtype."""
    cfg = weights.net.cfg
    generator = torch.Generator().manual_seed(seed)
    clip = weights.clip.state_dict() if weights.clip is not None else None
    state = pack_to_sat(weights.net.state_dict(), clip)
    for key in ROPE_TABLES.values():
        state[key] = state[key].bfloat16()
    for layer in range(cfg.layers):
        for param in ("weight", "bias"):
            state[f"mixins.adaln_layer.k_layer_norm.{layer}.{param}"] = torch.randn(cfg.head_dim, generator=generator)
    state["transformer.position_embeddings.weight"] = torch.randn(256, cfg.hidden, generator=generator)
    if clip is not None:
        text = SAT_CLIP_PREFIX.removesuffix("visual.")
        state[text + "token_embedding.weight"] = torch.randn(49, 8, generator=generator)
        state[text + "positional_embedding"] = torch.randn(77, 8, generator=generator)
        state[text + "text_projection"] = torch.randn(8, 8, generator=generator)
        state[text + "logit_scale"] = torch.tensor(4.6052)
    return state


def save_released_layout(module_state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Save ``module_state`` as DeepSpeed saves ``mp_rank_00_model_states.pt`` for SAT."""
    torch.save({
        "module": module_state,
        "buffer_names": [key for key in module_state if "rope" in key],
        "optimizer": None,
        "param_shapes": [OrderedDict((key, value.shape) for key, value in module_state.items())],
        "frozen_param_shapes": None,
        "shared_params": {},
        "frozen_param_fragments": None,
        "lr_scheduler": None,
        "data_sampler": None,
        "random_ltd": None,
        "sparse_tensor_module_names": set(),
        "skipped_steps": 0,
        "global_steps": 1000,
        "global_samples": 64000,
        "dp_world_size": 8,
        "mp_world_size": 1,
        "ds_config": {"train_micro_batch_size_per_gpu": 8, "bf16": {"enabled": True}},
        "ds_version": "0.14.0",
        "iteration": 1000,
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.zeros(16, dtype=torch.uint8),
    }, str(path))
