"""Model configuration for the Qwen2/Qwen2.5, Qwen3 and Llama 3 decoder families.

The three families share one architecture (pre-norm decoder, grouped-query attention, RoPE, SwiGLU,
RMSNorm) and differ only in:
  qwen2 (also Qwen2.5): biases on the q/k/v projections;
  qwen3: per-head RMSNorm on queries and keys (before RoPE), explicit head_dim;
  llama: no biases; Llama 3.1+ scale RoPE frequencies (rope_type 'llama3').
"""

import dataclasses
from typing import Any

import jax.numpy as jnp

ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
}
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("auto", "xla", "splash", "cudnn")
LAYER_LOOPS = ("auto", "scan", "unroll")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3 RoPE frequency scaling (Hugging Face rope_type 'llama3')."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static description of a decoder; hashable, so it can key jit caches."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  model_type: str = "qwen2"
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 32768
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  attention_impl: str = "auto"  # training attention: auto | xla | splash | cudnn (attention.py)
  layer_loop: str = "auto"  # training layers: auto (unroll on CPU, else scan) | scan | unroll

  def __post_init__(self):
    if self.model_type not in ARCHITECTURES:
      raise ValueError(
          f"model_type={self.model_type!r} is not supported; expected one of {sorted(ARCHITECTURES)}"
      )
    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
    ):
      if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
        raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
      )
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl={self.attention_impl!r} must be one of {ATTENTION_IMPLS}")
    if self.layer_loop not in LAYER_LOOPS:
      raise ValueError(f"layer_loop={self.layer_loop!r} must be one of {LAYER_LOOPS}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"{name}={getattr(self, name)!r} must be one of {DTYPES}")

  @property
  def qkv_bias(self) -> bool:
    return self.model_type == "qwen2"

  @property
  def qk_norm(self) -> bool:
    return self.model_type == "qwen3"

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def jnp_param_dtype(self):
    return jnp.dtype(self.param_dtype)

  @classmethod
  def from_hf(cls, hf: dict[str, Any], **overrides) -> "ModelConfig":
    """Reads a Hugging Face config.json dict (transformers 4.x or 5.x layout).

    `overrides` replace fields afterwards (e.g. dtype='bfloat16', remat=True).
    """
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
      raise ValueError(
          f"config.json model_type={model_type!r} is not supported; expected one of "
          f"{sorted(ARCHITECTURES)}"
      )
    archs = hf.get("architectures") or [ARCHITECTURES[model_type]]
    if list(archs) != [ARCHITECTURES[model_type]]:
      raise ValueError(
          f"config.json architectures={archs!r} is not supported for model_type="
          f"{model_type!r}; expected [{ARCHITECTURES[model_type]!r}]"
      )
    if hf.get("hidden_act", "silu") != "silu":
      raise ValueError(
          f"config.json hidden_act={hf['hidden_act']!r} is not supported (only 'silu')"
      )
    if hf.get("use_sliding_window", False):
      raise ValueError("config.json use_sliding_window=True is not supported")
    if model_type != "qwen2" and hf.get("attention_bias", False):
      raise ValueError(f"config.json attention_bias=True is not supported for {model_type}")
    if hf.get("mlp_bias", False):
      raise ValueError("config.json mlp_bias=True is not supported")

    # transformers 5 keeps theta and scaling in `rope_parameters`; 4.x in rope_theta/rope_scaling.
    rope = dict(hf.get("rope_parameters") or {})
    rope.update(hf.get("rope_scaling") or {})
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
      raise ValueError("config.json partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
      scaling = None
    elif rope_type == "llama3":
      scaling = RopeScaling(
          factor=float(rope["factor"]),
          low_freq_factor=float(rope["low_freq_factor"]),
          high_freq_factor=float(rope["high_freq_factor"]),
          original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
      )
    else:
      raise ValueError(
          f"config.json rope_type={rope_type!r} is not supported (only 'default' and 'llama3')"
      )

    num_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or (
        128 if model_type == "qwen3" else hf["hidden_size"] // num_heads
    )
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        model_type=model_type,
        rope_theta=float(theta),
        rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
    )
    fields.update(overrides)
    return cls(**fields)

  def to_hf(self) -> dict[str, Any]:
    """The config.json dict that transformers 5 reads into the matching *ForCausalLM."""
    rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
    if self.rope_scaling is not None:
      rope.update(rope_type="llama3", **dataclasses.asdict(self.rope_scaling))
    hf = dict(
        architectures=[ARCHITECTURES[self.model_type]],
        model_type=self.model_type,
        vocab_size=self.vocab_size,
        hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size,
        num_hidden_layers=self.num_layers,
        num_attention_heads=self.num_heads,
        num_key_value_heads=self.num_kv_heads,
        head_dim=self.head_dim,
        hidden_act="silu",
        rms_norm_eps=self.rms_norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=self.tie_word_embeddings,
        max_position_embeddings=self.max_position_embeddings,
        dtype=self.param_dtype,
    )
    if self.model_type == "qwen2":
      hf["use_sliding_window"] = False
    else:
      hf["attention_bias"] = False
    return hf
