"""Hugging Face bridge: local checkpoint directories <-> (Decoder, params), and tokenizers.

A checkpoint directory holds `config.json` and either `model.safetensors` or
`model.safetensors.index.json` with its shards. Tensors are read with NumPy (no torch), stacked over
layers in our layout and cast to the configured param dtype, one parameter at a time and straight
into its sharding: each host reads only the blocks of each tensor that its devices hold.
"""

import dataclasses
import functools
import json
import math
import os
from typing import Any

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from entropy_rl import fileio
from entropy_rl.models.config import ModelConfig
from entropy_rl.models.decoder import Decoder, init_params

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class _Layout:
  """How an HF tensor becomes ours: each of its dimensions split into `split[i]`, then the split
  dimensions transposed by `perm` (e.g. q_proj: [N*H, D] -> [N, H, D] -> [D, N, H])."""

  split: tuple[tuple[int, ...], ...]
  perm: tuple[int, ...]

  @property
  def hf_shape(self) -> tuple[int, ...]:
    return tuple(math.prod(g) for g in self.split)

  def to_hf(self, w):
    return w.transpose(np.argsort(self.perm)).reshape(self.hf_shape)

  def read(self, tensor, index: tuple[slice, ...]) -> np.ndarray:
    """ours[index] (concrete slices) from `tensor` (a safetensors slice: `tensor[hf_index]`),
    reading the HF block that holds it: per HF dimension, whole rows of its split's inner
    dimensions over the range of its outer one."""
    split_index = [None] * len(self.perm)
    for i, p in enumerate(self.perm):
      split_index[p] = index[i]
    hf_index, block_shape, inner_index, k = [], [], [], 0
    for group in self.split:
      outer, inner = split_index[k], math.prod(group[1:])
      hf_index.append(slice(outer.start * inner, outer.stop * inner))
      block_shape += [outer.stop - outer.start, *group[1:]]
      inner_index += [slice(None), *split_index[k + 1 : k + len(group)]]
      k += len(group)
    block = np.asarray(tensor[tuple(hf_index)]).reshape(block_shape)
    return block[tuple(inner_index)].transpose(self.perm)


def _tensor_map(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[str, _Layout]]:
  """Our param path -> (HF tensor name ({i} = layer), its layout), per layer."""
  D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  F, V = cfg.intermediate_size, cfg.vocab_size
  vector = _Layout(((D,),), (0,))
  heads_in = lambda n: _Layout(((n, H), (D,)), (2, 0, 1))  # [n*H, D] -> [D, n, H]
  matrix = lambda o, i: _Layout(((o,), (i,)), (1, 0))  # [O, I] -> [I, O]
  attn, mlp = "model.layers.{i}.self_attn", "model.layers.{i}.mlp"
  m = {
      ("embed",): ("model.embed_tokens.weight", _Layout(((V,), (D,)), (0, 1))),
      ("final_norm",): ("model.norm.weight", vector),
      ("layers", "attn_norm"): ("model.layers.{i}.input_layernorm.weight", vector),
      ("layers", "mlp_norm"): ("model.layers.{i}.post_attention_layernorm.weight", vector),
      ("layers", "attn", "q_proj"): (f"{attn}.q_proj.weight", heads_in(N)),
      ("layers", "attn", "k_proj"): (f"{attn}.k_proj.weight", heads_in(K)),
      ("layers", "attn", "v_proj"): (f"{attn}.v_proj.weight", heads_in(K)),
      ("layers", "attn", "o_proj"): (
          f"{attn}.o_proj.weight",  # [D, N*H] -> [N, H, D]
          _Layout(((D,), (N, H)), (1, 2, 0)),
      ),
      ("layers", "mlp", "gate_proj"): (f"{mlp}.gate_proj.weight", matrix(F, D)),
      ("layers", "mlp", "up_proj"): (f"{mlp}.up_proj.weight", matrix(F, D)),
      ("layers", "mlp", "down_proj"): (f"{mlp}.down_proj.weight", matrix(D, F)),
  }
  if not cfg.tie_word_embeddings:
    m[("lm_head",)] = ("lm_head.weight", matrix(V, D))
  if cfg.qkv_bias:
    for p, n in (("q", N), ("k", K), ("v", K)):
      m[("layers", "attn", f"{p}_bias")] = (f"{attn}.{p}_proj.bias", _Layout(((n, H),), (0, 1)))
  if cfg.qk_norm:
    for p in ("q", "k"):
      m[("layers", "attn", f"{p}_norm")] = (f"{attn}.{p}_norm.weight", _Layout(((H,),), (0,)))
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
  """ModelConfig from `path/config.json` (local or a URI); `overrides` set e.g. dtype,
  param_dtype, remat."""
  file = fileio.join(path, CONFIG_FILE)
  if not fileio.exists(file) or os.path.isdir(file):
    raise ValueError(f"missing {file}")
  return ModelConfig.from_hf(json.loads(fileio.read_text(file)), **overrides)


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
  """Reads a Qwen2/Qwen2.5/Qwen3/Llama checkpoint directory into (Decoder, params).

  Each parameter is built with `jax.make_array_from_callback` straight into its sharding: every
  host reads (safetensors `get_slice`) only the blocks its own devices hold, so no device (and no
  host) ever holds a whole copy of a sharded parameter.

  Args:
    path: directory with config.json and model.safetensors (or a sharded index), local or a URI
      (gs://...: staged to a local temporary directory first, through `fileio`).
    shardings: optional pytree of `jax.sharding.Sharding` with the structure of the params (e.g.
      `policy.param_shardings`); default: the first device.
    **overrides: ModelConfig fields to replace (dtype, param_dtype, remat).
  """
  with fileio.Staged(path) as staged:
    return _load_local(staged.local, path, shardings, overrides)


def _load_local(local: str, path: str, shardings, overrides) -> tuple[Decoder, dict]:
  cfg = load_config(local, **overrides)
  tensors = _open_tensors(local)
  shapes = jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))
  dtype = np.dtype(cfg.jnp_param_dtype)

  def tensor(name, layout):
    if name not in tensors:
      raise ValueError(f"tensor {name} is missing from the checkpoint at {path}")
    t = tensors[name].get_slice(name)
    if tuple(t.get_shape()) != layout.hf_shape:
      raise ValueError(
          f"tensor {name} has shape {tuple(t.get_shape())}, expected " f"{layout.hf_shape}"
      )
    return t

  params = {}
  for key, (name, layout) in _tensor_map(cfg).items():
    shape = _get(shapes, key).shape
    layered = key[0] == "layers"
    names = [name.format(i=i) for i in range(cfg.num_layers)] if layered else [name]
    handles = [tensor(n, layout) for n in names]  # shapes checked before anything is read
    blocks = {}

    def block(index, handles=handles, layout=layout, layered=layered, shape=shape, blocks=blocks):
      bounds = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
      if bounds not in blocks:  # devices holding the same block (replicas) share one read
        index = tuple(slice(*b) for b in bounds)
        if layered:
          w = np.stack([layout.read(handles[i], index[1:]) for i in range(*bounds[0])])
        else:
          w = layout.read(handles[0], index)
        blocks[bounds] = w.astype(dtype)
      return blocks[bounds]

    sharding = (
        jax.sharding.SingleDeviceSharding(jax.devices()[0])
        if shardings is None
        else _get(shardings, key)
    )
    _set(params, key, jax.make_array_from_callback(shape, sharding, block))
  return Decoder(cfg), params


def save_hf(params, model_config: ModelConfig, path: str, tokenizer=None) -> None:
  """Writes config.json + model.safetensors (and the tokenizer, if given) for transformers.

  `AutoModelForCausalLM.from_pretrained(path)` loads the result; tensors keep the params' dtype.
  """
  os.makedirs(path, exist_ok=True)
  tensors = {}
  for key, (name, layout) in _tensor_map(model_config).items():
    w = np.asarray(jax.device_get(_get(params, key)))
    if key[0] == "layers":
      for i in range(model_config.num_layers):
        tensors[name.format(i=i)] = np.ascontiguousarray(layout.to_hf(w[i]))
    else:
      tensors[name] = np.ascontiguousarray(layout.to_hf(w))
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
