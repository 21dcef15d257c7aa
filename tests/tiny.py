"""The small decoder shape the model, sampler and plan tests share: vocabulary 61 (not a power of
two, so padding bugs show), 2 layers, 4 query heads over 2 KV heads (GQA), head_dim 8."""

from entropy_rl.models import ModelConfig

SHAPE = dict(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
)


def model_config(**overrides) -> ModelConfig:
  """`SHAPE` as a qwen2 ModelConfig, with `overrides` (any ModelConfig field)."""
  return ModelConfig(**{**SHAPE, "model_type": "qwen2", **overrides})
