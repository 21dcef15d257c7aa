"""Training attention: splash (Pallas, interpret mode on CPU) against the XLA path, the choice of
kernel by the platform compiled for, and the kernel under a mesh and on TPU topology devices."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from entropy_rl import sharding
from entropy_rl.models import Decoder, ModelConfig, attention, init_params


def _inputs(B=3, T=40, N=4, K=2, H=32):
  """GQA inputs whose rows are left-padded (7, 20, 7 tokens) and right-padded (5, 10 tokens)."""
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (B, T, N, H))
  k = jax.random.normal(ks[1], (B, T, K, H))
  v = jax.random.normal(ks[2], (B, T, K, H))
  pos = jnp.arange(T)
  start, end = jnp.array([0, 7, 20, 7])[:B, None], jnp.array([T, T - 5, T - 10, T])[:B, None]
  keys_BxT = (pos >= start) & (pos < end)
  cotangent = jax.random.normal(ks[3], (B, T, N, H)) * keys_BxT[:, :, None, None]
  return (q, k, v), keys_BxT, cotangent


def _value_and_grads(impl, qkv, keys_BxT, cotangent):
  def f(q, k, v):
    return attention.causal_attention(q, k, v, keys_BxT, impl)

  out, vjp = jax.vjp(f, *qkv)
  return out, vjp(cotangent)


def _attention_float64(q, k, v, keys_BxT):
  """softmax(q k^T / sqrt(H)) v over the real keys at or before each query, in float64 NumPy."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, N, H = q.shape
  k, v = np.repeat(k, N // k.shape[2], axis=2), np.repeat(v, N // v.shape[2], axis=2)
  scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
  allowed = np.tril(np.ones((T, T), bool))[None] & np.asarray(keys_BxT, bool)[:, None, :]
  scores = np.where(allowed[:, None], scores, -1e300)  # rows with no key: uniform, unread
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", probs, v)


@pytest.mark.parametrize("T", [40, 256, 300])
def test_blocked_xla_attention_matches_float64_and_one_block_gradients(T):
  """Query blocks of 128 (T = 256: two, T = 300: three, the last short) give the float64 values
  on real queries, and the gradients of one [T, T] block (jax.nn.dot_product_attention)."""
  qkv, keys_BxT, cotangent = _inputs(T=T)
  assert attention.query_block(T) == 128
  out, grads = _value_and_grads("xla", qkv, keys_BxT, cotangent)
  real = np.asarray(keys_BxT)[:, :, None, None]
  np.testing.assert_allclose(
      np.asarray(out) * real, _attention_float64(*qkv, keys_BxT) * real, atol=2e-5
  )
  assert np.all(np.isfinite(np.asarray(out)))

  def one_block(q, k, v):
    mask = keys_BxT[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="xla")

  _, vjp = jax.vjp(one_block, *qkv)
  for g, ref in zip(grads, vjp(cotangent)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(ref), atol=5e-5)


def test_splash_matches_xla_on_real_positions_with_grouped_query_heads_and_padding():
  """T = 40 is padded to the kernel's 128; rows before and after the real tokens are padding."""
  qkv, keys_BxT, cotangent = _inputs()
  ref, ref_grads = _value_and_grads("xla", qkv, keys_BxT, cotangent)
  out, grads = _value_and_grads("splash", qkv, keys_BxT, cotangent)
  assert np.isfinite(out).all()  # padded query rows attend to padded keys, not to nothing
  real = np.asarray(keys_BxT)
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=2e-5)
  for g, g_ref in zip(grads, ref_grads):  # cotangents only on real positions
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g, g_ref, atol=2e-5)


@pytest.mark.parametrize("impl", ["xla", "splash"])
def test_packed_segments_attend_only_within_their_sequence(impl):
  """Rows packed with three sequences (segments 1-3, then padding 0): every real position gets the
  float64 attention over its own sequence's keys at or before it, values and gradients."""
  (q, k, v), _, _ = _inputs(B=2, T=40)
  segments_BxT = jnp.asarray(np.repeat([[1, 2, 3, 0], [3, 1, 2, 2]], [13, 9, 11, 7], axis=1))
  real = np.asarray(segments_BxT) > 0
  cotangent = jax.random.normal(jax.random.key(5), q.shape) * real[:, :, None, None]
  out, vjp = jax.vjp(lambda *a: attention.causal_attention(*a, segments_BxT, impl), q, k, v)
  grads = vjp(cotangent)

  def ref(q, k, v):
    B, T, N, H = q.shape
    k, v = jnp.repeat(k, N // k.shape[2], axis=2), jnp.repeat(v, N // v.shape[2], axis=2)
    scores = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
    same = segments_BxT[:, :, None] == segments_BxT[:, None, :]
    allowed = jnp.tril(jnp.ones((T, T), bool))[None] & same
    scores = jnp.where(allowed[:, None], scores, -jnp.inf)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(scores, axis=-1), v)

  with jax.enable_x64():
    q64, k64, v64 = (jnp.asarray(np.asarray(x), jnp.float64) for x in (q, k, v))
    want, vjp64 = jax.vjp(ref, q64, k64, v64)
    want_grads = vjp64(jnp.asarray(np.asarray(cotangent), jnp.float64))
    want, want_grads = np.asarray(want), [np.asarray(g) for g in want_grads]
  np.testing.assert_allclose(np.asarray(out)[real], want[real], atol=2e-5)
  for g, g_want in zip(grads, want_grads):
    np.testing.assert_allclose(np.asarray(g), g_want, atol=2e-5)


def test_splash_under_a_mesh_shards_rows_and_heads():
  """4 rows over ('data', 'fsdp') = (2, 2), 4 query heads over 'tensor' = 2 (2 KV heads: one
  per shard); another mesh whose 'tensor' divides the query heads but not the KV heads."""
  qkv, keys_BxT, cotangent = _inputs(B=4, K=2)
  ref, ref_grads = _value_and_grads("xla", qkv, keys_BxT, cotangent)
  real = np.asarray(keys_BxT)
  for shape, kv_heads in (((2, 2, 2), 2), ((1, 2, 4), 1)):
    mesh = jax.make_mesh(shape, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    q, k, v = qkv
    if kv_heads == 1:
      k, v = k[:, :, :1], v[:, :, :1]
      ref, ref_grads = _value_and_grads("xla", (q, k, v), keys_BxT, cotangent)
    with jax.set_mesh(mesh):
      out, grads = jax.jit(lambda *a: _value_and_grads("splash", a, keys_BxT, cotangent))(q, k, v)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=2e-5)
    for g, g_ref in zip(grads, ref_grads):
      np.testing.assert_allclose(g, g_ref, atol=2e-5)


def test_auto_picks_splash_on_tpu_cudnn_on_gpu_in_half_precision_else_xla():
  assert attention.resolve("auto", "tpu", jnp.float32) == "splash"
  assert attention.resolve("auto", "gpu", jnp.bfloat16) == "cudnn"
  assert attention.resolve("auto", "gpu", jnp.float32) == "xla"
  assert attention.resolve("auto", "cpu", jnp.bfloat16) == "xla"
  assert attention.resolve("splash", "cpu", jnp.float32) == "splash"
  with pytest.raises(ValueError, match="attention_impl='cudnn' needs a GPU"):
    attention.resolve("cudnn", "cpu", jnp.bfloat16)
  with pytest.raises(ValueError, match="attention_impl='flash' must be one of"):
    attention.resolve("flash", "tpu", jnp.bfloat16)
  with pytest.raises(ValueError, match="attention_impl='flash' must be one of"):
    ModelConfig(8, 8, 8, 1, 1, 1, 8, attention_impl="flash")


CFG = ModelConfig(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=128,
    num_layers=1,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    dtype="bfloat16",
)


def _lowered_forward(cfg, mesh):
  model = Decoder(cfg)
  params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  tokens = jax.ShapeDtypeStruct((4, 256), jnp.int32)
  with jax.set_mesh(mesh):
    return jax.jit(lambda p, t: model.apply({"params": p}, t)).lower(params, tokens)


def test_the_kernel_follows_the_platform_of_the_mesh_traced_for():
  """Traced for TPU topology devices on this CPU host, 'auto' lowers the Mosaic kernel; for the
  CPU devices (and with attention_impl='xla' for TPU) it does not."""
  pytest.importorskip("libtpu")
  from entropy_rl import plan

  tpu_mesh = sharding.make_mesh(
      1, -1, 1, devices=plan.topology_devices(plan.parse_topology("v5p-8"))
  )
  cpu_mesh = sharding.make_mesh(1, -1, 1, devices=jax.devices()[:4])
  assert "tpu_custom_call" in _lowered_forward(CFG, tpu_mesh).as_text()
  assert "tpu_custom_call" not in _lowered_forward(CFG, cpu_mesh).as_text()
  xla = dataclasses.replace(CFG, attention_impl="xla")
  assert "tpu_custom_call" not in _lowered_forward(xla, tpu_mesh).as_text()
  _lowered_forward(CFG, tpu_mesh).compile()  # XLA:TPU compiles the kernel
