"""entropy_rl.stats against float64 NumPy references, with padding."""

import fractions
import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from entropy_rl import stats


def _np_logsumexp(z):
  m = np.max(z, axis=-1, keepdims=True)
  return (m + np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True)))[..., 0]


def np_logprobs_and_entropy(logits, targets, temperature):
  z = np.asarray(logits, np.float64) / temperature
  lse = _np_logsumexp(z)
  logp_all = z - lse[..., None]
  p = np.exp(logp_all)
  entropy = np.sum(np.where(p > 0, -p * np.where(p > 0, logp_all, 0.0), 0.0), axis=-1)
  return np.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0], entropy


def np_masked_mean(x, m, axis=None):
  x, m = np.asarray(x, np.float64), np.asarray(m, np.float64)
  den = m.sum(axis=axis)
  return np.where(den > 0, np.where(m > 0, x, 0).sum(axis=axis) / np.maximum(den, 1e-300), 0.0)


def np_top_mask(scores, valid, k):
  """k highest valid scores, ties to the lower flat index."""
  flat_s, flat_v = scores.reshape(-1).astype(np.float64), valid.reshape(-1)
  idx = [i for i in np.argsort(-flat_s, kind="stable") if flat_v[i]][:k]
  keep = np.zeros(flat_s.shape, bool)
  keep[idx] = True
  return keep.reshape(scores.shape)


def _padded(rng, b, t, min_len=0):
  lengths = rng.integers(min_len, t + 1, size=b)
  lengths[0] = t
  return (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)


@pytest.fixture(scope="module")
def logits_case():
  rng = np.random.default_rng(0)
  b, t, v = 3, 5, 37
  logits = rng.normal(size=(b, t, v)).astype(np.float32) * 3.0
  logits[0, 0] = -30.0
  logits[0, 0, 4] = 30.0  # peaked: entropy ~1e-24 must not come out as cancellation noise
  targets = rng.integers(0, v, size=(b, t))
  return logits, targets


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
def test_token_logprobs_and_entropy_matches_float64(logits_case, temperature):
  logits, targets = logits_case
  logp, entropy = stats.token_logprobs_and_entropy(
      jnp.asarray(logits), jnp.asarray(targets), temperature
  )
  ref_logp, ref_entropy = np_logprobs_and_entropy(logits, targets, temperature)
  assert logp.dtype == entropy.dtype == jnp.float32
  np.testing.assert_allclose(logp, ref_logp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(entropy, ref_entropy, rtol=1e-5, atol=1e-7)
  assert np.all(np.asarray(entropy) >= 0)


def test_entropy_with_masked_vocabulary_is_finite_with_finite_gradient(logits_case):
  logits, targets = logits_case
  logits = logits.copy()
  logits[..., :3] = -np.inf
  targets = np.maximum(targets, 3)
  ref_logp, ref_entropy = np_logprobs_and_entropy(logits, targets, 1.0)

  def f(x):
    logp, entropy = stats.token_logprobs_and_entropy(x, jnp.asarray(targets))
    return jnp.sum(entropy) + jnp.sum(logp), (logp, entropy)

  grad, (logp, entropy) = jax.grad(f, has_aux=True)(jnp.asarray(logits))
  np.testing.assert_allclose(entropy, ref_entropy, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(logp, ref_logp, rtol=1e-5, atol=1e-5)
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[..., :3] == 0)


def _np_grads(h, w, targets, temperature, g_logp, g_entropy):
  """Float64 gradient of sum(g_logp * logp + g_entropy * H) wrt h and w via dz."""
  z = h.astype(np.float64) @ w.astype(np.float64) / temperature
  lse = _np_logsumexp(z)
  p = np.exp(z - lse[..., None])
  entropy = np.sum(p * (lse[..., None] - z), axis=-1)
  onehot = np.eye(w.shape[1])[targets]
  dz = (
      g_logp[..., None] * (onehot - p)
      + g_entropy[..., None] * p * (lse[..., None] - z - entropy[..., None])
  ) / temperature
  dh = dz @ w.astype(np.float64).T
  dw = np.einsum("btd,btv->dv", h.astype(np.float64), dz)
  return dh, dw


@pytest.fixture(scope="module")
def fused_case():
  rng = np.random.default_rng(1)
  b, t, d, v = 2, 5, 16, 37
  h = rng.normal(size=(b, t, d)).astype(np.float32)
  h[0, :3] *= np.array([5.0, 10.0, 20.0], np.float32)[:, None]  # peaked, down to H ~ 1e-18
  w = (rng.normal(size=(d, v)) * 0.7).astype(np.float32)
  targets = rng.integers(0, v, size=(b, t))
  mask = _padded(rng, b, t, min_len=1)
  g_logp = (rng.normal(size=(b, t)) * mask).astype(np.float32)
  g_entropy = (rng.normal(size=(b, t)) * mask).astype(np.float32)
  return h, w, targets, g_logp, g_entropy


def _weighted(fn, targets, temperature, g_logp, g_entropy, **kw):
  def loss(h, w):
    logp, entropy = fn(h, w, targets, temperature, **kw)
    return jnp.sum(g_logp * logp) + jnp.sum(g_entropy * entropy), (logp, entropy)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def _plain(h, w, targets, temperature):
  return stats.token_logprobs_and_entropy(h @ w, targets, temperature)


# chunk 8 leaves a last chunk of 5 columns (37 = 4 * 8 + 5); 37 is one chunk; 64 > V.
@pytest.mark.parametrize("chunk_size,temperature", [(8, 1.0), (37, 0.7), (64, 1.3), (1, 1.0)])
def test_fused_equals_plain_values_and_gradients(fused_case, chunk_size, temperature):
  h, w, targets, g_logp, g_entropy = fused_case
  (_, (logp, entropy)), (dh, dw) = _weighted(
      stats.fused_logprobs_and_entropy,
      targets,
      temperature,
      g_logp,
      g_entropy,
      chunk_size=chunk_size,
  )(h, w)
  (_, (plogp, pentropy)), (pdh, pdw) = _weighted(_plain, targets, temperature, g_logp, g_entropy)(
      h, w
  )
  ref_logp, ref_entropy = np_logprobs_and_entropy(
      h.astype(np.float64) @ w.astype(np.float64), targets, temperature
  )
  ref_dh, ref_dw = _np_grads(h, w, targets, temperature, g_logp, g_entropy)
  np.testing.assert_allclose(logp, plogp, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(entropy, pentropy, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dh, pdh, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dw, pdw, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logp, ref_logp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(entropy, ref_entropy, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dh, ref_dh, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dw, ref_dw, rtol=1e-4, atol=1e-5)


def _all_avals(jaxpr):
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      yield var.aval
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _all_avals(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _all_avals(sub)


def test_fused_never_materialises_tokens_by_vocab(fused_case):
  h, w, targets, g_logp, g_entropy = fused_case
  v = w.shape[1]

  def loss(h, w):
    logp, entropy = stats.fused_logprobs_and_entropy(h, w, targets, chunk_size=8)
    return jnp.sum(g_logp * logp + g_entropy * entropy)

  grad_fn = jax.grad(loss, argnums=(0, 1))
  shapes = {
      tuple(a.shape) for a in _all_avals(jax.make_jaxpr(grad_fn)(h, w).jaxpr) if hasattr(a, "shape")
  }
  assert (w.shape[0], v) in shapes  # dW is built in place
  assert all(s == (w.shape[0], v) for s in shapes if v in s), shapes
  assert max(math.prod(s) for s in shapes if w.shape[0] not in s) < h.shape[0] * h.shape[1] * v


def test_fused_bf16_inputs(fused_case):
  h, w, targets, g_logp, g_entropy = fused_case
  h16, w16 = jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  (_, (logp, entropy)), (dh, dw) = _weighted(
      stats.fused_logprobs_and_entropy, targets, 1.0, g_logp, g_entropy, chunk_size=8
  )(h16, w16)
  h64, w64 = np.asarray(h16, np.float64), np.asarray(w16, np.float64)
  ref_logp, ref_entropy = np_logprobs_and_entropy(h64 @ w64, targets, 1.0)
  ref_dh, ref_dw = _np_grads(h64, w64, targets, 1.0, g_logp, g_entropy)
  assert logp.dtype == entropy.dtype == jnp.float32
  assert dh.dtype == dw.dtype == jnp.bfloat16
  # Forward accumulates in float32 from exact bf16 inputs; backward rounds dz to bf16.
  np.testing.assert_allclose(logp, ref_logp, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(entropy, ref_entropy, rtol=1e-5, atol=1e-5)
  scale_h, scale_w = np.abs(ref_dh).max(), np.abs(ref_dw).max()
  np.testing.assert_allclose(np.asarray(dh, np.float64) / scale_h, ref_dh / scale_h, atol=2e-2)
  np.testing.assert_allclose(np.asarray(dw, np.float64) / scale_w, ref_dw / scale_w, atol=2e-2)


def test_fused_rejects_bad_arguments(fused_case):
  h, w, targets, _, _ = fused_case
  with pytest.raises(ValueError, match="chunk_size"):
    stats.fused_logprobs_and_entropy(h, w, targets, chunk_size=0)
  with pytest.raises(ValueError, match="temperature"):
    stats.fused_logprobs_and_entropy(h, w, targets, temperature=0.0)
  with pytest.raises(ValueError, match="unembed_DxV"):
    stats.fused_logprobs_and_entropy(h, w.T, targets)
  with pytest.raises(ValueError, match="targets_BxT"):
    stats.fused_logprobs_and_entropy(h, w, targets[:, :-1])
  with pytest.raises(ValueError, match="targets_BxT"):
    stats.token_logprobs_and_entropy(h, targets[:1])


@pytest.fixture(scope="module")
def token_case():
  rng = np.random.default_rng(2)
  b, t = 5, 8
  mask = _padded(rng, b, t)
  mask[-1] = 0.0  # a fully padded row
  x = rng.normal(size=(b, t)).astype(np.float32)
  x[mask == 0] = 1e30  # garbage in padding must never leak
  adv = np.repeat(rng.normal(size=(b, 1)), t, axis=1).astype(np.float32)
  return x, adv, mask


def test_masked_mean(token_case):
  x, _, mask = token_case
  np.testing.assert_allclose(stats.masked_mean(x, mask), np_masked_mean(x, mask), rtol=1e-6)
  np.testing.assert_allclose(
      stats.masked_mean(x, mask, axis=-1), np_masked_mean(x, mask, axis=-1), rtol=1e-6
  )
  assert float(stats.masked_mean(x, np.zeros_like(mask))) == 0.0


def test_token_covariance(token_case):
  logp, adv, mask = token_case
  valid = mask > 0
  lp, a = logp.astype(np.float64), adv.astype(np.float64)
  ref = np.where(valid, (a - a[valid].mean()) * (lp - lp[valid].mean()), 0.0)
  np.testing.assert_allclose(stats.token_covariance(logp, adv, mask), ref, rtol=1e-5, atol=1e-6)
  grad = jax.grad(lambda x: jnp.sum(stats.token_covariance(x, adv, mask)))(jnp.asarray(logp))
  assert np.all(np.asarray(grad) == 0)


@pytest.mark.parametrize(
    "rho,n",
    [
        (0.2, 10),
        (0.3, 10),
        (0.7, 10),
        (0.1, 30),
        (2e-4, 5000),
        (2e-3, 1500),
        (0.28, 25),
        (1.0, 7),
        (0.5, 0),
    ],
)
def test_fraction_count_is_exact_for_decimal_fractions(rho, n):
  # Exact decimal arithmetic: float64 itself gets ceil(0.28 * 25) wrong (7.000000000000001 -> 8).
  for m in (n, n + 1, n + 3):
    exact = fractions.Fraction(repr(rho)) * m
    assert int(stats.fraction_count(rho, jnp.int32(m), "ceil")) == math.ceil(exact)
    assert int(stats.fraction_count(rho, jnp.int32(m), "floor")) == math.floor(exact)


@pytest.mark.parametrize("rho", [0.2, 0.5, 1.0, 0.01])
def test_entropy_mask_top_and_bottom(token_case, rho):
  entropy, _, mask = token_case
  entropy = np.abs(entropy)
  valid = mask > 0
  entropy[valid] = np.round(entropy[valid], 1)  # ties
  k = math.ceil(rho * valid.sum())
  top = np.asarray(stats.entropy_token_mask(entropy, mask, rho, "top"))
  bottom = np.asarray(stats.entropy_token_mask(entropy, mask, rho, "bottom"))
  assert top.dtype == np.float32 and top.sum() == k
  np.testing.assert_array_equal(top > 0, np_top_mask(entropy, valid, k))
  np.testing.assert_array_equal(bottom > 0, valid & ~(top > 0))
  if k < valid.sum():
    assert entropy[top > 0].min() >= entropy[bottom > 0].max()


def test_entropy_mask_random_is_uniform(token_case):
  _, _, mask = token_case
  valid = mask > 0
  rho = 0.25
  k = math.ceil(rho * valid.sum())
  keys = jax.random.split(jax.random.key(0), 2000)
  masks = np.asarray(
      jax.vmap(
          lambda key: stats.entropy_token_mask(jnp.zeros(mask.shape), mask, rho, "random", key)
      )(keys)
  )
  assert np.all(masks.sum(axis=(1, 2)) == k)
  assert np.all(masks[:, ~valid] == 0)
  assert not np.array_equal(masks[0], masks[1])
  freq, p = masks.mean(axis=0)[valid], k / valid.sum()
  assert np.all(np.abs(freq - p) < 5 * math.sqrt(p * (1 - p) / len(keys)))


def test_entropy_mask_top_quantile_trl_vector():
  entropy = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.7, 0.8, 0.9, 1.0, 0.0, 0.0]], np.float32)
  mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], np.float32)
  keep = stats.entropy_token_mask(entropy, mask, 0.2, "top_quantile")  # TRL threshold 0.8
  np.testing.assert_array_equal(keep, [[0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0]])


@pytest.mark.parametrize("rho", [0.2, 0.55, 1.0])
def test_entropy_mask_top_quantile_matches_numpy(token_case, rho):
  entropy, _, mask = token_case
  valid = mask > 0
  threshold = np.quantile(entropy[valid].astype(np.float64), 1 - rho)
  keep = stats.entropy_token_mask(entropy, mask, rho, "top_quantile")
  np.testing.assert_array_equal(np.asarray(keep) > 0, valid & (entropy >= threshold))


def test_entropy_mask_rejects_bad_arguments(token_case):
  entropy, _, mask = token_case
  for rho in (0.0, -0.1, 1.5, True):
    with pytest.raises(ValueError, match="rho"):
      stats.entropy_token_mask(entropy, mask, rho, "top")
  with pytest.raises(ValueError, match="mode"):
    stats.entropy_token_mask(entropy, mask, 0.2, "highest")
  with pytest.raises(ValueError, match="rng"):
    stats.entropy_token_mask(entropy, mask, 0.2, "random")
  with pytest.raises(ValueError, match="mask_BxT"):
    stats.entropy_token_mask(entropy, mask[:, 1:], 0.2, "top")


def test_entropy_summary(token_case):
  entropy, _, mask = token_case
  entropy = np.abs(entropy)
  valid = mask > 0
  summary = stats.entropy_summary(entropy, mask)
  rows = valid.any(axis=1)
  e = entropy.astype(np.float64)
  np.testing.assert_allclose(summary["token_mean"], e[valid].mean(), rtol=1e-6)
  np.testing.assert_allclose(
      summary["seq_mean"], np.mean([e[i][valid[i]].mean() for i in np.flatnonzero(rows)]), rtol=1e-6
  )
  for key, q in (("p50", 50), ("p80", 80), ("p95", 95)):
    np.testing.assert_allclose(summary[key], np.percentile(e[valid], q), rtol=1e-6)
  empty = stats.entropy_summary(entropy, np.zeros_like(mask))
  assert all(float(v) == 0.0 for v in empty.values())
