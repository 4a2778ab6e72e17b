"""Which self-attention layers of a UNet get a GSPN module, and the set of those modules.

Layers are found by their module path in an SD1.5/SDXL-layout UNet
(``input_blocks.<i>.<j>.transformer_blocks.<t>.attn1``, ``middle_block...``,
``output_blocks...``), which also gives the host's patch key ``(block, number, index)``.
The *level* of a layer is how many times the map was halved before it (0 = the full latent),
read from the Downsample/Upsample blocks in front of it; it lets a user keep plain attention
in the lowest-resolution levels.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .module import GSPNAttention, Operations, file_layout, module_layout

_ATTN1 = re.compile(r"^(?:(input|output)_blocks\.(\d+)|(middle)_block)\.\d+\.transformer_blocks\.(\d+)\.attn1$")


@dataclass(frozen=True)
class LayerSpec:
    """One self-attention layer of the host UNet."""

    name: str                       # module path of the attn1 layer in the diffusion model
    block: tuple[str, int, int]     # ("input" | "middle" | "output", block number, transformer index)
    dim: int                        # width of its q, k, v
    level: int                      # times the map was halved before this layer

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "LayerSpec":
        return cls(name=data["name"], block=tuple(data["block"]), dim=int(data["dim"]), level=int(data["level"]))


@dataclass(frozen=True)
class GSPNConfig:
    """Shape of every GSPN module: scan chunk length and proxy width ``dim // proxy_ratio``.

    The paper uses chunks of 4 for text-to-image and a proxy of dim/8 (SD1.5) or dim/32 (SDXL).
    ``chunk=None`` scans whole rows/columns (the global variant).
    """

    chunk: int | None = 4
    proxy_ratio: int = 8

    def proxy_dim(self, dim: int) -> int:
        return max(1, dim // self.proxy_ratio)


def _levels(diffusion_model: nn.Module) -> dict[str, int]:
    """Level of every input/middle/output block, from the Downsample/Upsample modules."""
    def has(block: nn.Module, kind: str) -> bool:
        return any(type(m).__name__ == kind for m in block.modules())

    levels, level = {}, 0
    for i, block in enumerate(getattr(diffusion_model, "input_blocks", [])):
        level += has(block, "Downsample")
        levels[f"input_{i}"] = level
    levels["middle_0"] = level
    for i, block in enumerate(getattr(diffusion_model, "output_blocks", [])):
        levels[f"output_{i}"] = level
        level -= has(block, "Upsample")
    return levels


def find_attn1_layers(diffusion_model: nn.Module) -> list[LayerSpec]:
    """Every UNet self-attention layer, in module order; raises if there is none."""
    levels = _levels(diffusion_model)
    specs = []
    for name, module in diffusion_model.named_modules():
        match = _ATTN1.match(name)
        if not match:
            continue
        kind = match.group(1) or match.group(3)
        number = int(match.group(2) or 0)
        specs.append(LayerSpec(name=name, block=(kind, number, int(match.group(4))),
                               dim=module.to_q.weight.shape[0], level=levels[f"{kind}_{number}"]))
    if not specs:
        raise ValueError("no UNet self-attention layers (input_blocks/middle_block/output_blocks ... "
                         "transformer_blocks.<i>.attn1) found: GSPN replaces the self-attention of "
                         "SD1.5/SDXL-style UNets only")
    return specs


class GSPNLayers(nn.Module):
    """One :class:`GSPNAttention` per host layer, looked up by the layer's module path; their
    Linear layers come from ``operations`` (default ``torch.nn``)."""

    def __init__(self, specs: Sequence[LayerSpec], config: GSPNConfig, operations: Operations = nn):
        super().__init__()
        self.specs = list(specs)
        self.config = config
        self.modules_list = nn.ModuleList(
            GSPNAttention(s.dim, config.proxy_dim(s.dim), config.chunk, operations) for s in self.specs)
        self._index = {s.name: i for i, s in enumerate(self.specs)}

    def __getitem__(self, name: str) -> GSPNAttention:
        return self.modules_list[self._index[name]]

    def items(self) -> Iterator[tuple[LayerSpec, GSPNAttention]]:
        return zip(self.specs, self.modules_list)

    def named_state(self) -> dict[str, torch.Tensor]:
        """Parameters keyed ``<layer module path>.<parameter>`` in the weight file's layout."""
        return {f"{spec.name}.{key}": value for spec, module in self.items()
                for key, value in file_layout(module.state_dict()).items()}

    def load_named_state(self, state: dict[str, torch.Tensor]) -> None:
        """The inverse of :meth:`named_state`."""
        for spec, module in self.items():
            prefix = spec.name + "."
            module.load_state_dict(module_layout({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}))
