"""GSPN for SD1.5/SDXL: propagation modules that stand in for the UNet's self-attention
(``attn1``), their weight files, and the distillation that makes those weights from the
model they will replace (no text-to-image GSPN weights are public)."""

from .layers import GSPNConfig, GSPNLayers, LayerSpec, find_attn1_layers
from .module import GSPNAttention
from .weights import GSPNWeightsError, TrainingRecord, load_gspn_weights, save_gspn_weights

__all__ = [
    "GSPNAttention", "GSPNConfig", "GSPNLayers", "GSPNWeightsError", "LayerSpec", "TrainingRecord",
    "find_attn1_layers", "load_gspn_weights", "save_gspn_weights",
]
