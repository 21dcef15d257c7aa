"""Flax Linen decoder for the Qwen2/Qwen2.5, Qwen3 and Llama 3 families, used functionally.

Pre-norm blocks: h += Attn(RMSNorm(h)); h += SwiGLU(RMSNorm(h)). Attention is grouped-query with
rotate-half RoPE, causal, and ignores padded keys. Every per-layer parameter has a leading `layers`
axis (one stacked Block). Training runs the layers as one `nn.scan` over it, so compile time does
not grow with depth, except on CPU (`ModelConfig.layer_loop`), where it unrolls them: XLA:CPU
zero-fills the scan's stacked residuals ([layers, tokens, mlp] and the attention scores) and
copies each layer's into them, about a fifth of an update step at the benchmark's shape.
Decoding is memory-bound instead, so it always unrolls the layers: layer l reads its own
parameters (`unstack_layers` splits the stacked ones once, before a sampler's decode loop) and
its own cache buffers `cache['k'][l]`, `cache['v'][l]`: it writes the T new slots first and then
attends over the buffer, so the donated cache is updated in place. A scanned layer would instead
copy its dynamic slice of the parameters and of the cache on every step. On CPU, decoding runs the
projections that share an input (q, k, v; gate, up) as one matmul each (`fuse_decode_dots`).

Two entry points:
  `Decoder.__call__(tokens_BxT, positions_BxT, attn_mask_BxT, return_hidden)`: training forward.
  `Decoder.decode(tokens_BxT, cache, attn_mask_BxT, positions_BxT, return_hidden)`: appends T tokens
    to an explicit KV cache (see `init_cache`) and returns (logits_BxTxV, new cache); prefill and
    one-token decoding are the same call.
  `Decoder.unembed(hidden_BxTxD)`: logits from hidden states (e.g. only the last prefill position).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from entropy_rl.models import attention
from entropy_rl.models.config import ModelConfig

Cache = dict[str, Any]
_init = nn.initializers.normal(stddev=0.02)


def _param(module, name, shape, axes, init=_init):
  cfg = module.config
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, cfg.jnp_param_dtype)


def dense(x_BxTxI, w_IxO):
  """x @ w over the last axis, computed as one [B*T, I] @ [I, O] matmul.

  With 3-D activations XLA:CPU turns the weight gradient (a contraction over B and T) into
  transposing copies of the [B*T, O] activation gradients that cost several times the matmuls;
  the 2-D form's gradient is a plain transposed-operand matmul.
  """
  x_NxI = x_BxTxI.reshape(-1, x_BxTxI.shape[-1])
  return (x_NxI @ w_IxO).reshape(*x_BxTxI.shape[:-1], w_IxO.shape[-1])


def dense_each(x_BxTxI, ws, fuse: bool):
  """[dense(x, w) for w in ws]; with `fuse`, one matmul on the weights concatenated along their
  outputs, split back."""
  if not fuse:
    return [dense(x_BxTxI, w) for w in ws]
  splits = np.cumsum([w.shape[-1] for w in ws])[:-1]
  return jnp.split(dense(x_BxTxI, jnp.concatenate(ws, axis=-1)), splits, axis=-1)


def fuse_decode_dots() -> bool:
  """Whether decoding computes q, k, v and then gate, up as one matmul each (`dense_each`): on CPU,
  whose decode steps have few rows (64 in `bench_sampling`: 0.93x the sampler's time, median of 16
  interleaved rounds in one process; the benchmark's own runs drift by more than that); XLA hoists
  the weights' concatenation out of the sampler's loop. Training (no gain measured in the update
  step) and accelerators keep separate dots, every weight sharded where it lies."""
  return attention.platform() == "cpu"


def rms_norm(x, scale, eps, dtype):
  """x / sqrt(mean(x^2) + eps) * scale, statistics in float32 (as Hugging Face)."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return scale.astype(dtype) * y.astype(dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
  """Inverse RoPE frequencies [head_dim // 2], float32 as transformers computes them."""
  dim = config.head_dim
  exponent = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)
  inv_freq = (np.float32(1.0) / np.float32(config.rope_theta) ** exponent).astype(np.float32)
  s = config.rope_scaling
  if s is None:
    return inv_freq
  # Llama 3: keep high frequencies, divide low ones by `factor`, interpolate in between.
  old_len = np.float32(s.original_max_position_embeddings)
  low_freq_wavelen = old_len / np.float32(s.low_freq_factor)
  high_freq_wavelen = old_len / np.float32(s.high_freq_factor)
  wavelen = np.float32(2 * np.pi) / inv_freq
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(s.factor), inv_freq)
  smooth = (old_len / wavelen - np.float32(s.low_freq_factor)) / np.float32(
      s.high_freq_factor - s.low_freq_factor
  )
  smoothed = (1 - smooth) * scaled / np.float32(s.factor) + smooth * scaled
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_sin_cos(positions_BxT, config: ModelConfig):
  """sin, cos of shape [B, T, head_dim] (the half-frequencies repeated twice)."""
  angles_BxTxK = positions_BxT.astype(jnp.float32)[..., None] * rope_inv_freq(config)
  angles_BxTxH = jnp.concatenate([angles_BxTxK, angles_BxTxK], axis=-1)
  return jnp.sin(angles_BxTxH), jnp.cos(angles_BxTxH)


def apply_rope(x_BxTxNxH, sin_BxTxH, cos_BxTxH):
  """x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1]."""
  x1, x2 = jnp.split(x_BxTxNxH, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  dtype = x_BxTxNxH.dtype
  sin, cos = sin_BxTxH[:, :, None].astype(dtype), cos_BxTxH[:, :, None].astype(dtype)
  return x_BxTxNxH * cos + rotated * sin


class Attention(nn.Module):
  """Grouped-query self-attention.

  Training (`cache_kv` None): causal within segments (`mask` [B, 1, T]: segment ids, 0 = padding).
  Decoding (`cache_kv` = this layer's keys [B, K, H, S] and values [B, K, S, H], `mask` = (valid slots
  [B, S] including the new tokens', the new tokens' first slot `index`, a scalar or one per row
  [B])): the new keys and values
  are written into their T slots first, then the queries attend to the valid slots at or before
  their own. Returns the output and the updated (keys, values) cache; the write-then-read order
  lets XLA update the donated cache in place with no copy.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, sin_BxTxH, cos_BxTxH, mask, cache_kv, fuse: bool = False):
    """`fuse`: q, k, v as one matmul (`dense_each`)."""
    cfg = self.config
    dtype = cfg.jnp_dtype
    D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q_proj = _param(self, "q_proj", (D, N, H), ("embed", "heads", "head_dim"))
    k_proj = _param(self, "k_proj", (D, K, H), ("embed", "kv_heads", "head_dim"))
    v_proj = _param(self, "v_proj", (D, K, H), ("embed", "kv_heads", "head_dim"))
    o_proj = _param(self, "o_proj", (N, H, D), ("heads", "head_dim", "embed"))
    x = x_BxTxD.astype(dtype)
    B, T = x.shape[:2]
    q, k, v = dense_each(
        x,
        [w.reshape(D, -1).astype(dtype) for w in (q_proj, k_proj, v_proj)],
        fuse,
    )
    q_BxTxNxH, k_BxTxKxH, v_BxTxKxH = (y.reshape(B, T, -1, H) for y in (q, k, v))
    if cfg.qkv_bias:
      zeros = nn.initializers.zeros_init()
      q_BxTxNxH += _param(self, "q_bias", (N, H), ("heads", "head_dim"), zeros).astype(dtype)
      k_BxTxKxH += _param(self, "k_bias", (K, H), ("kv_heads", "head_dim"), zeros).astype(dtype)
      v_BxTxKxH += _param(self, "v_bias", (K, H), ("kv_heads", "head_dim"), zeros).astype(dtype)
    if cfg.qk_norm:
      ones = nn.initializers.ones_init()
      q_norm = _param(self, "q_norm", (H,), ("norm",), ones)
      k_norm = _param(self, "k_norm", (H,), ("norm",), ones)
      q_BxTxNxH = rms_norm(q_BxTxNxH, q_norm, cfg.rms_norm_eps, dtype)
      k_BxTxKxH = rms_norm(k_BxTxKxH, k_norm, cfg.rms_norm_eps, dtype)
    q_BxTxNxH = apply_rope(q_BxTxNxH, sin_BxTxH, cos_BxTxH)
    k_BxTxKxH = apply_rope(k_BxTxKxH, sin_BxTxH, cos_BxTxH)

    if cache_kv is None:
      out_BxTxNxH = attention.causal_attention(
          q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask[:, 0], cfg.attention_impl
      )
    else:
      valid_BxS, index = mask
      kc_BxKxHxS, vc_BxKxSxH = cache_kv
      # The cache's rows (`cache_batch`) may be split finer than the activations' (`batch`, as in
      # `sharding.decode_rules`): the attention over the cache runs on its rows.
      rows = lambda x, name, heads: nn.with_logical_constraint(x, (name, "length", heads, None))
      q_BxTxNxH = rows(q_BxTxNxH, "cache_batch", "heads")
      k_BxTxKxH = rows(k_BxTxKxH, "cache_batch", "kv_heads")
      v_BxTxKxH = rows(v_BxTxKxH, "cache_batch", "kv_heads")
      cache_kv = (
          _write_slots(kc_BxKxHxS, jnp.transpose(k_BxTxKxH, (0, 2, 3, 1)), index, axis=3),
          _write_slots(vc_BxKxSxH, jnp.transpose(v_BxTxKxH, (0, 2, 1, 3)), index, axis=2),
      )
      out_BxTxNxH = _cached_attention(q_BxTxNxH, *cache_kv, valid_BxS, index)
      out_BxTxNxH = rows(out_BxTxNxH, "batch", "heads")
    out_BxTxD = dense(out_BxTxNxH.reshape(B, T, N * H), o_proj.reshape(N * H, D).astype(dtype))
    return out_BxTxD, cache_kv


def _cached_attention(q_BxTxNxH, kc_BxKxHxS, vc_BxKxSxH, valid_BxS, index):
  """Softmax attention of the T queries at slots index .. index + T - 1 (`index` a scalar or [B])
  over the valid cache slots at or before their own (the new tokens' keys and values are already in
  the cache).

  Keys are cached [B, K, H, S] and values [B, K, S, H]: both products are batched over (B, K) and
  read the cache along S contiguously, with no transpose per step. One query per row (T = 1, a
  decode step) is a batched matrix-vector product, written as multiply-and-reduce: XLA fuses it into
  one pass over the cache, where a batched dot of [N/K, H] x [H, S] blocks runs 3x slower on CPU.
  """
  B, T, N, H = q_BxTxNxH.shape
  K, S = kc_BxKxHxS.shape[1], kc_BxKxHxS.shape[3]
  dtype = q_BxTxNxH.dtype
  kc_BxKxHxS, vc_BxKxSxH = kc_BxKxHxS.astype(dtype), vc_BxKxSxH.astype(dtype)
  q_BxTxKxGxH = q_BxTxNxH.reshape(B, T, K, N // K, H)
  if T == 1:
    q_BxKxGxHx1 = q_BxTxKxGxH[:, 0, :, :, :, None].astype(jnp.float32)
    scores = jnp.sum(q_BxKxGxHx1 * kc_BxKxHxS[:, :, None].astype(jnp.float32), axis=-2)
    scores = scores[:, :, :, None]
  else:
    scores = jnp.einsum(
        "btkgh,bkhs->bkgts", q_BxTxKxGxH, kc_BxKxHxS, preferred_element_type=jnp.float32
    )
  query_slot_Bx1x1 = jnp.reshape(index, (-1, 1, 1))  # B or 1 rows
  slot_BxTxS = query_slot_Bx1x1 + jnp.arange(T)[:, None] >= jnp.arange(S)[None, :]
  allowed_BxTxS = valid_BxS.astype(bool)[:, None, :] & slot_BxTxS
  scores = jnp.where(allowed_BxTxS[:, None, None], scores * H**-0.5, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype)  # [B, K, G, T, S]
  if T == 1:
    out = jnp.sum(
        probs[:, :, :, 0, :, None].astype(jnp.float32) * vc_BxKxSxH[:, :, None].astype(jnp.float32),
        axis=-2,
    ).astype(dtype)[:, None]
  else:
    out = jnp.einsum("bkgts,bksh->btkgh", probs, vc_BxKxSxH)
  return out.reshape(B, T, N, H)


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, fuse: bool = False):
    """`fuse`: gate and up as one matmul (`dense_each`)."""
    cfg = self.config
    dtype = cfg.jnp_dtype
    D, F = cfg.hidden_size, cfg.intermediate_size
    gate = _param(self, "gate_proj", (D, F), ("embed", "mlp"))
    up = _param(self, "up_proj", (D, F), ("embed", "mlp"))
    down = _param(self, "down_proj", (F, D), ("mlp", "embed"))
    x = x_BxTxD.astype(dtype)
    g_BxTxF, u_BxTxF = dense_each(x, [gate.astype(dtype), up.astype(dtype)], fuse)
    h_BxTxF = jax.nn.silu(g_BxTxF) * u_BxTxF
    h_BxTxF = nn.with_logical_constraint(h_BxTxF, ("batch", "length", "mlp"))
    return dense(h_BxTxF, down.astype(dtype))


class Block(nn.Module):
  """One pre-norm decoder layer, shaped for nn.scan (carry h). `cache_kv`: None in training, this
  layer's cached (keys, values) when decoding; returns h and the updated (keys, values)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, h_BxTxD, cache_kv, sin_BxTxH, cos_BxTxH, mask):
    cfg = self.config
    ones = nn.initializers.ones_init()
    D = cfg.hidden_size
    attn_norm = _param(self, "attn_norm", (D,), ("norm",), ones)
    mlp_norm = _param(self, "mlp_norm", (D,), ("norm",), ones)
    fuse = cache_kv is not None and fuse_decode_dots()
    x = rms_norm(h_BxTxD, attn_norm, cfg.rms_norm_eps, cfg.jnp_dtype)
    attn = Attention(cfg, name="attn")
    attn_BxTxD, new_kv = attn(x, sin_BxTxH, cos_BxTxH, mask, cache_kv, fuse)
    h_BxTxD = h_BxTxD + attn_BxTxD
    x = rms_norm(h_BxTxD, mlp_norm, cfg.rms_norm_eps, cfg.jnp_dtype)
    h_BxTxD = h_BxTxD + MLP(cfg, name="mlp")(x, fuse)
    h_BxTxD = nn.with_logical_constraint(h_BxTxD, ("batch", "length", "embed"))
    return h_BxTxD, (None if cache_kv is None else new_kv)


class Decoder(nn.Module):
  """Decoder-only language model; see the module docstring for the two entry points."""

  config: ModelConfig

  def setup(self):
    cfg = self.config
    V, D = cfg.vocab_size, cfg.hidden_size
    self.embed = _param(self, "embed", (V, D), ("vocab", "embed"))
    if not cfg.tie_word_embeddings:
      self.lm_head = _param(self, "lm_head", (D, V), ("embed", "vocab"))
    self.final_norm = _param(self, "final_norm", (D,), ("norm",), nn.initializers.ones_init())
    block = nn.remat(Block, prevent_cse=False) if cfg.remat else Block
    self.layers = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
        length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg)

  def __call__(
      self,
      tokens_BxT,
      positions_BxT=None,
      attn_mask_BxT=None,
      return_hidden=False,
      segments_BxT=None,
  ):
    """Training forward: logits_BxTxV (float32), or the final-normed hidden_BxTxD.

    A token attends to the tokens at or before it in its segment: `segments_BxT` (packed rows:
    one id per sequence, 0 on padding) or else `attn_mask_BxT` (one sequence a row).
    """
    B, T = tokens_BxT.shape
    if attn_mask_BxT is None:
      attn_mask_BxT = jnp.ones((B, T), jnp.int32)
    if positions_BxT is None:
      positions_BxT = default_positions(attn_mask_BxT)
    if segments_BxT is None:
      segments_BxT = attn_mask_BxT
    segments_Bx1xT = segments_BxT.astype(jnp.int32)[:, None, :]  # causality: in the attention
    h_BxTxD, sin_BxTxH, cos_BxTxH = self._embed(tokens_BxT, positions_BxT)
    if self.is_initializing() or layer_loop(self.config) == "scan":
      h_BxTxD, _ = self.layers(h_BxTxD, None, sin_BxTxH, cos_BxTxH, segments_Bx1xT)
    else:
      block = Block(self.config, parent=None)

      def layer(params, h_BxTxD):
        h_BxTxD, _ = block.apply(
            {"params": params}, h_BxTxD, None, sin_BxTxH, cos_BxTxH, segments_Bx1xT
        )
        return h_BxTxD

      if self.config.remat:
        layer = jax.checkpoint(layer, prevent_cse=False)
      for params in unstack_layers(self.variables["params"])["layers"]:
        h_BxTxD = layer(params, h_BxTxD)
    h_BxTxD = rms_norm(h_BxTxD, self.final_norm, self.config.rms_norm_eps, self.config.jnp_dtype)
    return h_BxTxD if return_hidden else self.unembed(h_BxTxD)

  def decode(
      self, tokens_BxT, cache: Cache, attn_mask_BxT=None, positions_BxT=None, return_hidden=False
  ):
    """Appends T tokens at slot cache['index'] and returns (logits_BxTxV or hidden_BxTxD, cache).

    The index is a scalar (every row writes the same slots) or one per row, [B] (a continuous-
    batching sampler, whose rows are at different steps of different responses).

    The parameters' `layers` may be stacked (as trained) or split by `unstack_layers`.

    A query attends to the cache slots marked valid at or before its own slot. Positions default to
    the number of valid slots before each token (so left-padded prompts get positions 0, 1, ...).
    """
    B, T = tokens_BxT.shape
    if attn_mask_BxT is None:
      attn_mask_BxT = jnp.ones((B, T), jnp.int32)
    index = cache["index"]
    if positions_BxT is None:
      positions_BxT = jnp.sum(cache["mask"], axis=1, keepdims=True) + default_positions(
          attn_mask_BxT
      )
    h_BxTxD, sin_BxTxH, cos_BxTxH = self._embed(tokens_BxT, positions_BxT)
    valid_BxS = _write_slots(cache["mask"], attn_mask_BxT, index, axis=1)
    block = Block(self.config, parent=None)
    layers = self.variables["params"]["layers"]
    if not isinstance(layers, tuple):
      layers = unstack_layers({"layers": layers})["layers"]
    new_k, new_v = [], []
    for params, k_BxKxHxS, v_BxKxSxH in zip(layers, cache["k"], cache["v"]):
      h_BxTxD, (k_BxKxHxS, v_BxKxSxH) = block.apply(
          {"params": params},
          h_BxTxD,
          (k_BxKxHxS, v_BxKxSxH),
          sin_BxTxH,
          cos_BxTxH,
          (valid_BxS, index),
      )
      new_k.append(k_BxKxHxS)
      new_v.append(v_BxKxSxH)
    h_BxTxD = rms_norm(h_BxTxD, self.final_norm, self.config.rms_norm_eps, self.config.jnp_dtype)
    new_cache = dict(k=tuple(new_k), v=tuple(new_v), mask=valid_BxS, index=index + T)
    return (h_BxTxD if return_hidden else self.unembed(h_BxTxD)), new_cache

  def _embed(self, tokens_BxT, positions_BxT):
    h_BxTxD = jnp.take(self.embed, tokens_BxT, axis=0).astype(self.config.jnp_dtype)
    h_BxTxD = nn.with_logical_constraint(h_BxTxD, ("batch", "length", "embed"))
    return (h_BxTxD, *rope_sin_cos(positions_BxT, self.config))

  def unembed(self, h_BxTxD):
    """Float32 logits_BxTxV from final-normed hidden states."""
    unembed_DxV = unembedding(
        {"embed": self.embed, "lm_head": getattr(self, "lm_head", None)}, self.config
    )
    dtype = self.config.jnp_dtype
    return jnp.einsum(
        "btd,dv->btv",
        h_BxTxD.astype(dtype),
        unembed_DxV.astype(dtype),
        preferred_element_type=jnp.float32,
    )


def layer_loop(config: ModelConfig) -> str:
  """'scan' or 'unroll': `config.layer_loop`, with 'auto' unrolling on CPU only (see the module
  docstring), by the platform compiled for (`attention.platform`)."""
  if config.layer_loop != "auto":
    return config.layer_loop
  return "unroll" if attention.platform() == "cpu" else "scan"


def default_positions(attn_mask_BxT):
  """Position of each token among the real ones: cumsum(mask) - 1 (0 on left padding)."""
  return jnp.maximum(jnp.cumsum(attn_mask_BxT, axis=1) - 1, 0).astype(jnp.int32)


def unstack_layers(params) -> dict:
  """`params` with the stacked `layers` subtree split into a tuple of per-layer subtrees.

  `Decoder.decode` accepts either form; a sampler passes the split one so that its decode loop
  reads each layer's weights in place instead of slicing (copying) them on every step. Under jit
  the split is one copy of the layer weights, held while the loop runs.
  """
  stacked = params["layers"]
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  return {
      **params,
      "layers": tuple(jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(num_layers)),
  }


def _write_slots(cache, new, index, axis: int):
  """The cache with slots index .. index + T - 1 along `axis` set to `new` (T long on that axis);
  `index` is a scalar or one per row [B] (then an in-place scatter of each row's T slots)."""
  new = new.astype(cache.dtype)
  if jnp.ndim(index) == 0:
    start = [0] * cache.ndim
    start[axis] = index
    return jax.lax.dynamic_update_slice(cache, new, start)

  def write_row(row, new_row, i):
    start = [0] * row.ndim
    start[axis - 1] = i
    return jax.lax.dynamic_update_slice(row, new_row, start)

  return jax.vmap(write_row)(cache, new, index)


def init_cache(config: ModelConfig, batch_size: int, max_len: int) -> Cache:
  """An empty KV cache in config.dtype: per layer, keys [B, kv_heads, head_dim, S] (in `k`) and
  values [B, kv_heads, S, head_dim] (in `v`); mask [B, S] (1 = a valid slot), index (next slot,
  one for all rows; a sampler may replace it by one per row, [B])."""
  B, K, S, H = batch_size, config.num_kv_heads, max_len, config.head_dim
  return dict(
      k=tuple(jnp.zeros((B, K, H, S), config.jnp_dtype) for _ in range(config.num_layers)),
      v=tuple(jnp.zeros((B, K, S, H), config.jnp_dtype) for _ in range(config.num_layers)),
      mask=jnp.zeros((batch_size, max_len), jnp.int32),
      index=jnp.zeros((), jnp.int32),
  )


@functools.partial(jax.jit, static_argnums=0)
def init_params(config: ModelConfig, rng) -> dict:
  """Randomly initialised params (normal(0.02) weights, unit norms, zero biases), unboxed."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return nn.unbox(Decoder(config).init(rng, tokens)["params"])


def param_logical_axes(config: ModelConfig) -> dict:
  """Tuples of logical axis names with the structure of `init_params(config, rng)`."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  boxed = jax.eval_shape(Decoder(config).init, jax.random.key(0), tokens)["params"]
  specs = nn.get_partition_spec(boxed)
  return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def unembedding(params, config: ModelConfig):
  """unembed_DxV: the tied embedding transposed, or lm_head."""
  return params["embed"].T if config.tie_word_embeddings else params["lm_head"]
