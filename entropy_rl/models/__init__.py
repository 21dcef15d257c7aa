"""Policy models: the Flax decoder for the Qwen2/Qwen2.5, Qwen3 and Llama 3 families."""

from entropy_rl.models.config import ModelConfig, RopeScaling
from entropy_rl.models.decoder import (
    Cache,
    Decoder,
    default_positions,
    init_cache,
    init_params,
    param_logical_axes,
    unembedding,
    unstack_layers,
)

__all__ = [
    "Cache",
    "Decoder",
    "ModelConfig",
    "RopeScaling",
    "default_positions",
    "init_cache",
    "init_params",
    "param_logical_axes",
    "unembedding",
    "unstack_layers",
]
