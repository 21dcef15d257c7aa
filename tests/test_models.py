"""Decoder: structure, logical axes, padding, KV-cache decoding, dtypes, remat, config round trip.

Parity with transformers' PyTorch models lives in test_hf.py.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from entropy_rl.models import (
    Decoder,
    ModelConfig,
    RopeScaling,
    init_cache,
    init_params,
    param_logical_axes,
    unembedding,
    unstack_layers,
)
from entropy_rl.models import decoder
from tests import tiny

TINY = tiny.SHAPE
QWEN2 = ModelConfig(**TINY, model_type="qwen2")
QWEN3 = ModelConfig(**TINY, model_type="qwen3", tie_word_embeddings=True)
LLAMA = ModelConfig(
    **TINY,
    model_type="llama",
    rope_theta=500000.0,
    rope_scaling=RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
    ),
)
LOGICAL_NAMES = {"embed", "vocab", "heads", "kv_heads", "head_dim", "mlp", "layers", "norm"}


@functools.partial(jax.jit, static_argnums=0, static_argnames="return_hidden")
def forward(cfg, params, tokens_BxT, attn_mask_BxT=None, positions_BxT=None, return_hidden=False):
  return Decoder(cfg).apply(
      {"params": params}, tokens_BxT, positions_BxT, attn_mask_BxT, return_hidden
  )


@functools.partial(jax.jit, static_argnums=0)
def decode(cfg, params, tokens_BxT, cache, attn_mask_BxT=None):
  return Decoder(cfg).apply(
      {"params": params}, tokens_BxT, cache, attn_mask_BxT, method=Decoder.decode
  )


def random_params(cfg, seed=0):
  """Random params of the decoder's shapes, drawn with NumPy (no compilation); norms around 1."""
  shapes = jax.eval_shape(init_params, cfg, jax.random.key(0))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), shapes)


@pytest.mark.parametrize("cfg", [QWEN2, QWEN3, LLAMA], ids=["qwen2", "qwen3", "llama"])
def test_params_and_logical_axes(cfg):
  params = jax.eval_shape(init_params, cfg, jax.random.key(0))
  axes = param_logical_axes(cfg)
  assert jax.tree.structure(params) == jax.tree.structure(
      axes, is_leaf=lambda x: isinstance(x, tuple)
  )
  flat_p = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  flat_a = dict(
      jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0]
  )
  for path, x in flat_p.items():
    names = flat_a[path]
    assert len(names) == x.ndim, path
    assert set(names) <= LOGICAL_NAMES, path
  layers = params["layers"]
  assert layers["attn"]["q_proj"].shape == (2, 32, 4, 8)
  assert layers["attn"]["k_proj"].shape == (2, 32, 2, 8)
  assert ("q_bias" in layers["attn"]) == (cfg.model_type == "qwen2")
  assert ("q_norm" in layers["attn"]) == (cfg.model_type == "qwen3")
  assert ("lm_head" in params) == (not cfg.tie_word_embeddings)
  assert jax.eval_shape(functools.partial(unembedding, config=cfg), params).shape == (32, 61)


def test_init_params():
  params = init_params(QWEN3, jax.random.key(0))
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))
  np.testing.assert_array_equal(params["layers"]["attn"]["q_norm"], 1.0)
  np.testing.assert_array_equal(params["final_norm"], 1.0)
  np.testing.assert_allclose(jnp.std(params["embed"]), 0.02, rtol=0.1)
  np.testing.assert_array_equal(unembedding(params, QWEN3), params["embed"].T)
  again = init_params(QWEN3, jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, params, again)


def test_return_hidden_matches_logits():
  params = random_params(QWEN2)
  tokens = jax.random.randint(jax.random.key(2), (2, 6), 0, 61)
  hidden = forward(QWEN2, params, tokens, return_hidden=True)
  logits = forward(QWEN2, params, tokens)
  assert hidden.shape == (2, 6, 32) and logits.dtype == jnp.float32
  np.testing.assert_allclose(hidden @ unembedding(params, QWEN2), logits, atol=1e-5)


@pytest.mark.parametrize("cfg", [LLAMA], ids=["llama"])
def test_left_padding_is_ignored(cfg):
  """A left-padded row gives the same logits on its real tokens as the unpadded sequence."""
  params = random_params(cfg)
  tokens = jax.random.randint(jax.random.key(3), (1, 5), 0, 61)
  ref = forward(cfg, params, tokens)
  padded = jnp.concatenate([jnp.full((1, 3), 7), tokens], axis=1)
  mask = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1]])
  out = forward(cfg, params, padded, mask)
  np.testing.assert_allclose(out[:, 3:], ref, atol=1e-5)
  explicit = forward(cfg, params, padded, mask, jnp.array([[0, 0, 0, 0, 1, 2, 3, 4]]))
  np.testing.assert_allclose(explicit, out, atol=0)


@pytest.mark.parametrize("cfg", [QWEN2, QWEN3], ids=["qwen2", "qwen3"])
def test_cached_decoding_equals_full_forward(cfg):
  """Prefill a left-padded batch, then decode one token at a time: same logits as one forward."""
  params = random_params(cfg)
  tokens = jax.random.randint(jax.random.key(4), (2, 9), 0, 61)
  mask = jnp.array([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9])
  full = forward(cfg, params, tokens, mask)
  cache = init_cache(cfg, 2, 12)
  logits, cache = decode(cfg, params, tokens[:, :5], cache, mask[:, :5])
  steps = [logits]
  for t in range(5, 9):
    logits, cache = decode(cfg, params, tokens[:, t : t + 1], cache)
    steps.append(logits)
  assert int(cache["index"]) == 9
  np.testing.assert_array_equal(cache["mask"][:, :9], mask)
  np.testing.assert_array_equal(cache["mask"][:, 9:], 0)
  valid = mask.astype(bool)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1)[valid], full[valid], atol=1e-5)
  # Per-layer (unstacked) parameters, as the sampler passes them, decode identically.
  split = unstack_layers(params)
  assert isinstance(split["layers"], tuple) and len(split["layers"]) == cfg.num_layers
  again, _ = decode(cfg, split, tokens[:, :5], init_cache(cfg, 2, 12), mask[:, :5])
  np.testing.assert_array_equal(again, steps[0])


def test_decoding_with_one_index_per_row_equals_full_forward():
  """Rows write at their own slots (row 1 leaves slots 5-6 empty, which it must not attend to)."""
  cfg = QWEN2
  params = random_params(cfg)
  tokens = jax.random.randint(jax.random.key(6), (2, 8), 0, 61)
  mask = jnp.array([[0, 1, 1, 1, 1, 1, 1, 1], [1] * 8])
  full = forward(cfg, params, tokens, mask)
  params = unstack_layers(params)
  _, cache = decode(cfg, params, tokens[:, :5], init_cache(cfg, 2, 12), mask[:, :5])
  cache = dict(cache, index=jnp.array([5, 7]))
  steps = []
  for t in range(5, 8):
    logits, cache = decode(cfg, params, tokens[:, t : t + 1], cache)
    steps.append(logits)
  np.testing.assert_array_equal(cache["index"], [8, 10])
  np.testing.assert_array_equal(
      cache["mask"], [[0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0, 0]]
  )
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full[:, 5:], atol=1e-5)


def test_decoding_on_cpu_fuses_the_projections(monkeypatch):
  """On CPU a decode step computes q, k, v and then gate, up as one matmul each (4 dots a layer
  and the unembedding), with the same logits as the separate dots."""
  cfg = QWEN2
  params = unstack_layers(random_params(cfg))
  tokens = jnp.array([[3], [5]])
  _, cache = decode(cfg, params, jnp.array([[1, 2], [4, 6]]), init_cache(cfg, 2, 4))

  def dots_and_logits(fuse):
    monkeypatch.setattr(decoder, "fuse_decode_dots", lambda: fuse)
    step = functools.partial(decode.__wrapped__, cfg)
    jaxpr = jax.make_jaxpr(step)(params, tokens, cache)
    dots = sum(e.primitive.name == "dot_general" for e in jaxpr.jaxpr.eqns)
    return dots, step(params, tokens, cache)[0]

  assert decoder.fuse_decode_dots()  # the tests run on CPU
  fused, logits = dots_and_logits(True)
  separate, expected = dots_and_logits(False)
  assert (fused, separate) == (4 * cfg.num_layers + 1, 7 * cfg.num_layers + 1)
  np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_bf16_and_remat():
  cfg = dataclasses.replace(QWEN3, dtype="bfloat16", param_dtype="bfloat16")
  params = random_params(cfg)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  tokens = jax.random.randint(jax.random.key(5), (2, 6), 0, 61)
  logits = forward(cfg, params, tokens)
  assert logits.dtype == jnp.float32 and np.isfinite(logits).all()
  hidden = jax.eval_shape(functools.partial(forward, cfg, return_hidden=True), params, tokens)
  assert hidden.dtype == jnp.bfloat16

  params = random_params(QWEN2)
  grad = jax.jit(jax.grad(lambda p, cfg: jnp.mean(forward(cfg, p, tokens) ** 2)), static_argnums=1)
  g_ref = grad(params, QWEN2)
  g_remat = grad(params, dataclasses.replace(QWEN2, remat=True))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g_ref, g_remat)


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_and_unrolled_layers_agree_in_values_and_gradients(remat):
  """`layer_loop` 'scan' and 'unroll' run the same stacked parameters: same logits and gradients
  on a left-padded batch (the unrolled forward has no while loop); 'auto' unrolls on CPU."""
  tokens = jax.random.randint(jax.random.key(7), (2, 6), 0, 61)
  mask = jnp.array([[0, 0, 1, 1, 1, 1], [1] * 6])
  params = random_params(QWEN3)

  def loss(p, cfg):
    return jnp.mean(forward(cfg, p, tokens, mask) ** 2 * mask[..., None])

  grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  scan = dataclasses.replace(QWEN3, layer_loop="scan", remat=remat)
  unroll = dataclasses.replace(QWEN3, layer_loop="unroll", remat=remat)
  (v_scan, g_scan), (v_unroll, g_unroll) = grad(params, scan), grad(params, unroll)
  np.testing.assert_allclose(v_unroll, v_scan, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g_unroll, g_scan)
  hlo = jax.jit(functools.partial(forward, unroll)).lower(params, tokens, mask).as_text()
  assert (
      "while" not in hlo
      and "while" in jax.jit(functools.partial(forward, scan)).lower(params, tokens, mask).as_text()
  )
  assert decoder.layer_loop(QWEN3) == "unroll"  # CPU
  with pytest.raises(ValueError, match="layer_loop"):
    dataclasses.replace(QWEN3, layer_loop="loop")


def test_config_hf_round_trip_and_errors():
  for cfg in (QWEN2, QWEN3, LLAMA):
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
  old_style = dict(LLAMA.to_hf())
  rope = old_style.pop("rope_parameters")
  old_style["rope_theta"] = rope.pop("rope_theta")
  old_style["rope_scaling"] = rope
  assert ModelConfig.from_hf(old_style) == LLAMA
  assert ModelConfig.from_hf(QWEN2.to_hf(), dtype="bfloat16").dtype == "bfloat16"
  with pytest.raises(ValueError, match="model_type"):
    ModelConfig.from_hf(dict(QWEN2.to_hf(), model_type="gpt2"))
  with pytest.raises(ValueError, match="architectures"):
    ModelConfig.from_hf(dict(QWEN2.to_hf(), architectures=["Qwen2ForSequenceClassification"]))
  with pytest.raises(ValueError, match="rope_type"):
    ModelConfig.from_hf(dict(QWEN2.to_hf(), rope_parameters={"rope_type": "yarn", "factor": 2.0}))
  with pytest.raises(ValueError, match="num_kv_heads"):
    dataclasses.replace(QWEN2, num_kv_heads=3)
  with pytest.raises(ValueError, match="dtype"):
    dataclasses.replace(QWEN2, dtype="float64")
