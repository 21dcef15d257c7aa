"""Hugging Face bridge: local checkpoint directories <-> (Decoder, params), and tokenizers.

A checkpoint directory holds `config.json` and either `model.safetensors` or
`model.safetensors.index.json` with its shards. Tensors are read with NumPy (no torch), stacked over
layers in our layout, cast to the configured param dtype and placed on device one parameter at a
time (straight into the given shardings, if any).
"""
import functools
import json
import os
from typing import Any, Callable

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from entropy_rl.models.config import ModelConfig
from entropy_rl.models.decoder import Decoder, init_params

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _tensor_map(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[str, Callable, Callable]]:
  """Our param path -> (HF tensor name ({i} = layer), HF -> ours, ours -> HF), per layer."""
  D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  same = lambda w: w
  heads_in = lambda n: (lambda w: w.reshape(n, H, D).transpose(2, 0, 1),   # [n*H, D] -> [D, n, H]
                        lambda w: w.transpose(1, 2, 0).reshape(n * H, D))
  bias = lambda n: (lambda b: b.reshape(n, H), lambda b: b.reshape(n * H))
  attn, mlp = "model.layers.{i}.self_attn", "model.layers.{i}.mlp"
  m = {
      ("embed",): ("model.embed_tokens.weight", same, same),
      ("final_norm",): ("model.norm.weight", same, same),
      ("layers", "attn_norm"): ("model.layers.{i}.input_layernorm.weight", same, same),
      ("layers", "mlp_norm"): ("model.layers.{i}.post_attention_layernorm.weight", same, same),
      ("layers", "attn", "q_proj"): (f"{attn}.q_proj.weight", *heads_in(N)),
      ("layers", "attn", "k_proj"): (f"{attn}.k_proj.weight", *heads_in(K)),
      ("layers", "attn", "v_proj"): (f"{attn}.v_proj.weight", *heads_in(K)),
      ("layers", "attn", "o_proj"): (f"{attn}.o_proj.weight",              # [D, N*H] -> [N, H, D]
                                     lambda w: w.reshape(D, N, H).transpose(1, 2, 0),
                                     lambda w: w.transpose(2, 0, 1).reshape(D, N * H)),
      ("layers", "mlp", "gate_proj"): (f"{mlp}.gate_proj.weight", np.transpose, np.transpose),
      ("layers", "mlp", "up_proj"): (f"{mlp}.up_proj.weight", np.transpose, np.transpose),
      ("layers", "mlp", "down_proj"): (f"{mlp}.down_proj.weight", np.transpose, np.transpose),
  }
  if not cfg.tie_word_embeddings:
    m[("lm_head",)] = ("lm_head.weight", np.transpose, np.transpose)
  if cfg.qkv_bias:
    for p, n in (("q", N), ("k", K), ("v", K)):
      m[("layers", "attn", f"{p}_bias")] = (f"{attn}.{p}_proj.bias", *bias(n))
  if cfg.qk_norm:
    for p in ("q", "k"):
      m[("layers", "attn", f"{p}_norm")] = (f"{attn}.{p}_norm.weight", same, same)
  return m


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def load_config(path: str, **overrides) -> ModelConfig:
  """ModelConfig from `path/config.json`; `overrides` set e.g. dtype, param_dtype, remat."""
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(file):
    raise ValueError(f"missing {file}")
  with open(file) as f:
    return ModelConfig.from_hf(json.load(f), **overrides)


def _open_tensors(path: str) -> dict[str, Any]:
  """HF tensor name -> an open safetensors handle holding it."""
  single, index = os.path.join(path, WEIGHTS_FILE), os.path.join(path, INDEX_FILE)
  if os.path.isfile(single):
    handle = safe_open(single, framework="numpy")
    return {name: handle for name in handle.keys()}
  if not os.path.isfile(index):
    raise ValueError(f"missing {single} (or {index})")
  with open(index) as f:
    weight_map = json.load(f)["weight_map"]
  handles = {}
  for shard in sorted(set(weight_map.values())):
    file = os.path.join(path, shard)
    if not os.path.isfile(file):
      raise ValueError(f"missing {file} (listed in {index})")
    handles[shard] = safe_open(file, framework="numpy")
  return {name: handles[shard] for name, shard in weight_map.items()}


def load_hf(path: str, *, shardings=None, **overrides) -> tuple[Decoder, dict]:
  """Reads a local Qwen2/Qwen2.5/Qwen3/Llama checkpoint directory into (Decoder, params).

  Args:
    path: directory with config.json and model.safetensors (or a sharded index).
    shardings: optional pytree of `jax.sharding.Sharding` with the structure of the params (e.g.
      from the logical axes of `param_logical_axes(load_config(path))`); each parameter is placed
      straight into its sharding.
    **overrides: ModelConfig fields to replace (dtype, param_dtype, remat).
  """
  cfg = load_config(path, **overrides)
  tensors = _open_tensors(path)
  shapes = jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))

  def read(name, to_ours, expected_shape):
    if name not in tensors:
      raise ValueError(f"tensor {name} is missing from the checkpoint at {path}")
    w = tensors[name].get_tensor(name)
    if w.shape != expected_shape:
      raise ValueError(f"tensor {name} has shape {w.shape}, expected {expected_shape}")
    return to_ours(w)

  params = {}
  for key, (name, to_ours, to_hf) in _tensor_map(cfg).items():
    shape = _get(shapes, key).shape
    if key[0] == "layers":
      hf_shape = to_hf(np.empty(shape[1:], np.int8)).shape
      w = np.stack([read(name.format(i=i), to_ours, hf_shape) for i in range(cfg.num_layers)])
    else:
      w = read(name, to_ours, to_hf(np.empty(shape, np.int8)).shape)
    w = w.astype(cfg.jnp_param_dtype)
    sharding = None if shardings is None else _get(shardings, key)
    _set(params, key, jax.device_put(w, sharding))
  return Decoder(cfg), params


def save_hf(params, model_config: ModelConfig, path: str, tokenizer=None) -> None:
  """Writes config.json + model.safetensors (and the tokenizer, if given) for transformers.

  `AutoModelForCausalLM.from_pretrained(path)` loads the result; tensors keep the params' dtype.
  """
  os.makedirs(path, exist_ok=True)
  tensors = {}
  for key, (name, _, to_hf) in _tensor_map(model_config).items():
    w = np.asarray(jax.device_get(_get(params, key)))
    if key[0] == "layers":
      for i in range(model_config.num_layers):
        tensors[name.format(i=i)] = np.ascontiguousarray(to_hf(w[i]))
    else:
      tensors[name] = np.ascontiguousarray(to_hf(w))
  save_file(tensors, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(model_config.to_hf(), f, indent=2)
  if tokenizer is not None:
    tokenizer.save_pretrained(path)


def load_tokenizer(path: str):
  """transformers.AutoTokenizer from a local directory (chat template included if saved).

  A generic tokenizer (tokenizer_class TokenizersBackend / PreTrainedTokenizerFast, e.g. one built
  with `tokenizers`) is loaded as such: AutoTokenizer would pick the class registered for the
  config.json model_type (Qwen2Tokenizer for qwen2), which pre-tokenizes differently.
  """
  import transformers

  if not os.path.isdir(path):
    raise ValueError(f"missing tokenizer directory {path}")
  config_file = os.path.join(path, "tokenizer_config.json")
  tokenizer_class = None
  if os.path.isfile(config_file):
    with open(config_file) as f:
      tokenizer_class = json.load(f).get("tokenizer_class")
  if tokenizer_class in ("TokenizersBackend", "PreTrainedTokenizerFast"):
    return transformers.PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
  return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
