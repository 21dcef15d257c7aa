"""Token statistics: log-probs, entropy (plain and fused), covariance, entropy token masks.

Conventions: `z = logits / T`; log-probs and entropies use the same `z`;
entropy is accumulated as the sum of non-negative terms `p_j (lse - z_j)`, in nats. Means are over
valid tokens (mask > 0) only; masked tokens never count and are never selected. Every selection has
static shapes (ranking by a sort, never `nonzero`) so it runs under `jax.jit`.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

ENTROPY_MASK_MODES = ("top", "bottom", "random", "top_quantile")


def _check_temperature(temperature):
  if (
      not isinstance(temperature, (int, float))
      or isinstance(temperature, bool)
      or not (math.isfinite(temperature) and temperature > 0)
  ):
    raise ValueError(f"temperature must be a positive float; got {temperature!r}")
  return float(temperature)


def check_same_shape(ref_name, ref, **arrays):
  """ValueError naming the first of `arrays` (None skipped) whose shape differs from `ref`'s."""
  for name, x in arrays.items():
    if x is not None and tuple(x.shape) != tuple(ref.shape):
      raise ValueError(
          f"{name} must have the shape of {ref_name} {tuple(ref.shape)}; " f"got {tuple(x.shape)}"
      )


# ----------------------------------------------------------------------------- log-probs, entropy


def token_logprobs_and_entropy(logits_BxTxV, targets_BxT, temperature=1.0):
  """Log-prob of each target and the entropy of softmax(logits / T), both float32 [B, T].

  With m the row's max logit and a_j = (m - logit_j) / T >= 0 (computed from raw logits, so the
  max term is exactly 0): s = sum exp(-a), lse - z_j = a_j + log s,
  `H = sum_j p_j (lse - z_j) = log s + sum_j exp(-a_j) a_j / s` (non-negative terms) and
  `logp_y = -a_y - log s`. `-inf` logits (a masked vocabulary) contribute 0.
  """
  temperature = _check_temperature(temperature)
  if tuple(logits_BxTxV.shape[:-1]) != tuple(targets_BxT.shape):
    raise ValueError(
        f"targets_BxT must have shape {tuple(logits_BxTxV.shape[:-1])} (the logits "
        f"without the vocabulary axis); got {tuple(targets_BxT.shape)}"
    )
  logits_BxTxV = logits_BxTxV.astype(jnp.float32)
  max_BxTx1 = jax.lax.stop_gradient(jnp.max(logits_BxTxV, axis=-1, keepdims=True))
  a_BxTxV = (max_BxTx1 - logits_BxTxV) / temperature
  finite_BxTxV = logits_BxTxV > -jnp.inf
  a_safe_BxTxV = jnp.where(finite_BxTxV, a_BxTxV, 0.0)
  e_BxTxV = jnp.where(finite_BxTxV, jnp.exp(-a_safe_BxTxV), 0.0)
  s_BxT = jnp.sum(e_BxTxV, axis=-1)
  log_s_BxT = jnp.log(s_BxT)
  entropy_BxT = log_s_BxT + jnp.sum(e_BxTxV * a_safe_BxTxV, axis=-1) / s_BxT
  a_y_BxT = jnp.take_along_axis(a_BxTxV, targets_BxT[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return -a_y_BxT - log_s_BxT, entropy_BxT


def _vocab_chunk(h_NxD, unembed_DxV, i, chunk):
  """Raw float32 logits [N, C] of vocabulary chunk `i`.

  Chunk i covers columns [i*C, (i+1)*C); the last chunk is shifted left to end at V, and its
  columns before i*C (already seen by chunk i-1) are marked invalid, so no padded copy of the
  unembedding is ever made.
  """
  vocab = unembed_DxV.shape[1]
  start = jnp.minimum(i * chunk, vocab - chunk)
  w_DxC = jax.lax.dynamic_slice_in_dim(unembed_DxV, start, chunk, axis=1)
  logits_NxC = jnp.dot(h_NxD, w_DxC, preferred_element_type=jnp.float32)
  cols_C = start + jnp.arange(chunk)
  return logits_NxC, w_DxC, start, cols_C, cols_C >= i * chunk


def _fused_forward(h_NxD, unembed_DxV, y_N, temperature, chunk):
  """Online statistics over vocabulary chunks, as in `token_logprobs_and_entropy`.

  Running raw max m, a_j = (m - logit_j) / T, s = sum exp(-a), u = sum exp(-a) a (terms >= 0);
  when m grows by d (d / T in z units) s <- s e^{-d/T} + ..., u <- e^{-d/T} (u + s d / T) + ....
  At the end H = log s + u / s and logp_y = -(m - logit_y) / T - log s.
  """
  n = h_NxD.shape[0]
  num_chunks = -(-unembed_DxV.shape[1] // chunk)

  def body(carry, i):
    m_N, s_N, u_N, logit_y_N = carry
    logits_NxC, _, _, cols_C, valid_C = _vocab_chunk(h_NxD, unembed_DxV, i, chunk)
    new_m_N = jnp.maximum(m_N, jnp.max(jnp.where(valid_C, logits_NxC, -jnp.inf), axis=1))
    a_NxC = jnp.where(valid_C, (new_m_N[:, None] - logits_NxC) / temperature, 0.0)
    e_NxC = jnp.where(valid_C, jnp.exp(-a_NxC), 0.0)
    shift_N = (new_m_N - m_N) / temperature
    scale_N = jnp.exp(-shift_N)
    s_N, u_N = (
        scale_N * s_N + jnp.sum(e_NxC, axis=1),
        scale_N * (u_N + jnp.where(s_N > 0, shift_N * s_N, 0.0)) + jnp.sum(e_NxC * a_NxC, axis=1),
    )
    hit_NxC = (cols_C == y_N[:, None]) & valid_C
    logit_y_N = logit_y_N + jnp.sum(jnp.where(hit_NxC, logits_NxC, 0.0), axis=1)
    return (new_m_N, s_N, u_N, logit_y_N), None

  zeros_N = jnp.zeros((n,), jnp.float32)
  init = (jnp.full((n,), -jnp.inf, jnp.float32), zeros_N, zeros_N, zeros_N)
  (m_N, s_N, u_N, logit_y_N), _ = jax.lax.scan(body, init, jnp.arange(num_chunks))
  log_s_N = jnp.log(s_N)
  return -(m_N - logit_y_N) / temperature - log_s_N, log_s_N + u_N / s_N, m_N, log_s_N


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused(h_NxD, unembed_DxV, y_N, temperature, chunk):
  logp_N, entropy_N, _, _ = _fused_forward(h_NxD, unembed_DxV, y_N, temperature, chunk)
  return logp_N, entropy_N


def _fused_fwd(h_NxD, unembed_DxV, y_N, temperature, chunk):
  logp_N, entropy_N, m_N, log_s_N = _fused_forward(h_NxD, unembed_DxV, y_N, temperature, chunk)
  return (logp_N, entropy_N), (h_NxD, unembed_DxV, y_N, m_N, log_s_N, entropy_N)


def _fused_bwd(temperature, chunk, residuals, cotangents):
  """Recomputes each chunk: dlogp/dz = onehot(y) - p, dH/dz_j = -p_j (z_j - sum_k p_k z_k)
  = p_j (a_j + log s - H); then dz = dlogits / T, logits = h @ W."""
  h_NxD, unembed_DxV, y_N, m_N, log_s_N, entropy_N = residuals
  g_logp_N, g_entropy_N = cotangents
  compute_dtype = jnp.result_type(h_NxD.dtype, unembed_DxV.dtype)
  num_chunks = -(-unembed_DxV.shape[1] // chunk)

  def body(carry, i):
    dh_NxD, dw_DxV = carry
    logits_NxC, w_DxC, start, cols_C, valid_C = _vocab_chunk(h_NxD, unembed_DxV, i, chunk)
    a_NxC = jnp.where(valid_C, (m_N[:, None] - logits_NxC) / temperature, 0.0)
    p_NxC = jnp.where(valid_C, jnp.exp(-a_NxC - log_s_N[:, None]), 0.0)
    onehot_NxC = ((cols_C == y_N[:, None]) & valid_C).astype(jnp.float32)
    dz_NxC = g_logp_N[:, None] * (onehot_NxC - p_NxC) + g_entropy_N[:, None] * p_NxC * (
        a_NxC + (log_s_N - entropy_N)[:, None]
    )
    dlogits_NxC = (dz_NxC / temperature).astype(compute_dtype)
    dh_NxD = dh_NxD + jnp.dot(dlogits_NxC, w_DxC.T, preferred_element_type=jnp.float32)
    dw_DxC = jnp.dot(h_NxD.T, dlogits_NxC, preferred_element_type=jnp.float32)
    old_DxC = jax.lax.dynamic_slice_in_dim(dw_DxV, start, chunk, axis=1)
    dw_DxV = jax.lax.dynamic_update_slice_in_dim(
        dw_DxV, jnp.where(valid_C, dw_DxC.astype(dw_DxV.dtype), old_DxC), start, axis=1
    )
    return (dh_NxD, dw_DxV), None

  init = (jnp.zeros(h_NxD.shape, jnp.float32), jnp.zeros_like(unembed_DxV))
  (dh_NxD, dw_DxV), _ = jax.lax.scan(body, init, jnp.arange(num_chunks))
  return dh_NxD.astype(h_NxD.dtype), dw_DxV, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_logprobs_and_entropy(
    hidden_BxTxD, unembed_DxV, targets_BxT, temperature=1.0, chunk_size=4096
):
  """`token_logprobs_and_entropy(hidden @ unembed, targets, T)` without a [tokens, vocab] array.

  A `lax.scan` over vocabulary chunks of `chunk_size` keeps only the per-token log-normaliser,
  entropy and target logit; the custom VJP recomputes each chunk's logits in the backward pass.
  Matmuls accumulate in float32 (bf16 inputs are fine); outputs are float32 [B, T].
  """
  temperature = _check_temperature(temperature)
  if (
      not isinstance(chunk_size, (int, np.integer))
      or isinstance(chunk_size, bool)
      or chunk_size < 1
  ):
    raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
  if unembed_DxV.ndim != 2 or hidden_BxTxD.shape[-1] != unembed_DxV.shape[0]:
    raise ValueError(
        f"unembed_DxV must have shape (hidden_BxTxD.shape[-1], V) = "
        f"({hidden_BxTxD.shape[-1]}, V); got {tuple(unembed_DxV.shape)}"
    )
  if tuple(hidden_BxTxD.shape[:-1]) != tuple(targets_BxT.shape):
    raise ValueError(
        f"targets_BxT must have shape {tuple(hidden_BxTxD.shape[:-1])}; "
        f"got {tuple(targets_BxT.shape)}"
    )
  chunk = int(min(chunk_size, unembed_DxV.shape[1]))
  h_NxD = hidden_BxTxD.reshape(-1, hidden_BxTxD.shape[-1])
  y_N = targets_BxT.reshape(-1).astype(jnp.int32)
  logp_N, entropy_N = _fused(h_NxD, unembed_DxV, y_N, temperature, chunk)
  return logp_N.reshape(targets_BxT.shape), entropy_N.reshape(targets_BxT.shape)


# ----------------------------------------------------------------------------- masked reductions


def masked_mean(x, mask, axis=None):
  """sum(x * mask) / sum(mask) over `axis`; 0 where the mask is empty; masked x never counts."""
  mask = jnp.asarray(mask).astype(jnp.float32)
  num = jnp.sum(jnp.where(mask != 0, x, 0.0) * mask, axis=axis)
  den = jnp.sum(mask, axis=axis)
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def token_covariance(logp_BxT, adv_BxT, mask_BxT):
  """EM Eq. 10: `(A - mean(A)) * (logp - mean(logp))`, means over valid tokens, not divided by n.

  Stop-gradient; 0 where masked.
  """
  check_same_shape("logp_BxT", logp_BxT, adv_BxT=adv_BxT, mask_BxT=mask_BxT)
  logp_BxT = jax.lax.stop_gradient(logp_BxT).astype(jnp.float32)
  adv_BxT = jax.lax.stop_gradient(adv_BxT).astype(jnp.float32)
  valid_BxT = mask_BxT > 0
  adv_c_BxT = adv_BxT - masked_mean(adv_BxT, valid_BxT)
  cov_BxT = adv_c_BxT * (logp_BxT - masked_mean(logp_BxT, valid_BxT))
  return jnp.where(valid_BxT, cov_BxT, 0.0)


def fraction_count(fraction, n, rounding):
  """`ceil` or `floor` of `fraction * n` for a traced int count n.

  The float32 product is snapped to the nearest integer when it lies within its rounding error,
  so decimal fractions count exactly (0.28 * 25 is 7, where float64 gives 7.000000000000001).
  """
  v = jnp.float32(fraction) * jnp.asarray(n).astype(jnp.float32)
  r = jnp.round(v)
  v = jnp.where(jnp.abs(v - r) <= 2.5e-7 * jnp.maximum(r, 1.0), r, v)
  v = jnp.ceil(v) if rounding == "ceil" else jnp.floor(v)
  return v.astype(jnp.int32)


def kept_count(rho, n):
  """HE Eq. 6's kept-token count of an entropy mask: ceil(rho * n)."""
  return fraction_count(rho, n, "ceil")


def top_count(ratio, n):
  """EM's covariance top-set size (Clip-Cov, KL-Cov, top-fraction means): max(1, floor(r * n))."""
  return jnp.maximum(fraction_count(ratio, n, "floor"), 1)


def top_k_mask(scores_BxT, valid_BxT, k):
  """Bool mask of exactly min(k, #valid) valid tokens with the highest scores.

  k may be traced; ties go to the lower flat index. One sort and one cumsum, static shapes.
  """
  valid_N = valid_BxT.reshape(-1)
  scores_N = jnp.where(valid_N, scores_BxT.reshape(-1).astype(jnp.float32), -jnp.inf)
  k = jnp.minimum(jnp.asarray(k, jnp.int32), jnp.sum(valid_N, dtype=jnp.int32))
  sorted_N = jnp.sort(scores_N)
  threshold = sorted_N[jnp.clip(scores_N.shape[0] - k, 0, scores_N.shape[0] - 1)]
  above_N = valid_N & (scores_N > threshold)
  tie_N = valid_N & (scores_N == threshold)
  need = k - jnp.sum(above_N, dtype=jnp.int32)
  keep_N = (above_N | (tie_N & (jnp.cumsum(tie_N, dtype=jnp.int32) <= need))) & (k > 0)
  return keep_N.reshape(valid_BxT.shape)


def masked_quantile(x_BxT, valid_BxT, q):
  """Linear-interpolation quantile(s) `q` of the valid entries (numpy/torch default); 0 if none."""
  valid_N = valid_BxT.reshape(-1)
  sorted_N = jnp.sort(jnp.where(valid_N, x_BxT.reshape(-1).astype(jnp.float32), jnp.inf))
  n = jnp.sum(valid_N, dtype=jnp.int32)
  pos = jnp.asarray(q, jnp.float32) * jnp.maximum(n - 1, 0).astype(jnp.float32)
  lo = jnp.floor(pos).astype(jnp.int32)
  hi = jnp.minimum(lo + 1, jnp.maximum(n - 1, 0))
  frac = pos - lo.astype(jnp.float32)
  x_lo, x_hi = sorted_N[lo], sorted_N[hi]
  return jnp.where(n > 0, x_lo + frac * (x_hi - x_lo), 0.0)


# ----------------------------------------------------------------------------- entropy masks


def check_entropy_mask_args(rho, mode, rng, rho_name="rho", mode_name="mode"):
  if mode not in ENTROPY_MASK_MODES:
    raise ValueError(f"{mode_name} must be one of {ENTROPY_MASK_MODES}; got {mode!r}")
  if not isinstance(rho, (int, float)) or isinstance(rho, bool) or not 0 < rho <= 1:
    raise ValueError(f"{rho_name} must be in (0, 1]; got {rho!r}")
  if mode == "random" and rng is None:
    raise ValueError(f"rng is required when {mode_name} is 'random'")


def entropy_token_mask(entropy_BxT, mask_BxT, rho, mode, rng=None):
  """HE Eq. 6 token mask (float32 [B, T]) over the valid tokens, entropy taken stop-gradient.

  `top`: exactly ceil(rho * n) highest-entropy tokens. `bottom`: the other valid tokens.
  `random`: ceil(rho * n) uniformly at random (needs `rng`). `top_quantile` (TRL): tokens with
  entropy >= the linear-interpolation (1 - rho) quantile of valid entropies.
  """
  check_entropy_mask_args(rho, mode, rng)
  check_same_shape("entropy_BxT", entropy_BxT, mask_BxT=mask_BxT)
  entropy_BxT = jax.lax.stop_gradient(entropy_BxT).astype(jnp.float32)
  valid_BxT = mask_BxT > 0
  if mode == "top_quantile":
    keep_BxT = valid_BxT & (entropy_BxT >= masked_quantile(entropy_BxT, valid_BxT, 1.0 - rho))
    return keep_BxT.astype(jnp.float32)
  k = kept_count(rho, jnp.sum(valid_BxT, dtype=jnp.int32))
  if mode == "random":
    scores_BxT = jax.random.uniform(rng, valid_BxT.shape)
  else:
    scores_BxT = entropy_BxT
  keep_BxT = top_k_mask(scores_BxT, valid_BxT, k)
  if mode == "bottom":
    keep_BxT = valid_BxT & ~keep_BxT
  return keep_BxT.astype(jnp.float32)


def entropy_summary(entropy_BxT, mask_BxT):
  """Token-mean (verl, HE), sequence-mean-token-mean (EM Eq. 5) and p50/p80/p95 of valid tokens."""
  check_same_shape("entropy_BxT", entropy_BxT, mask_BxT=mask_BxT)
  entropy_BxT = entropy_BxT.astype(jnp.float32)
  valid_BxT = mask_BxT > 0
  seq_B = masked_mean(entropy_BxT, valid_BxT, axis=-1)
  p50, p80, p95 = masked_quantile(entropy_BxT, valid_BxT, jnp.array([0.5, 0.8, 0.95]))
  return {
      "token_mean": masked_mean(entropy_BxT, valid_BxT),
      "seq_mean": masked_mean(seq_B, jnp.any(valid_BxT, axis=-1)),
      "p50": p50,
      "p80": p80,
      "p95": p95,
  }


COV_TOP_FRACTION = 0.02  # `cov/topk_mean` averages the top 2% of tokens by covariance (EM Table 1)


@jax.jit
def rollout_token_stats(entropy_NxL, logp_NxL, adv_NxL, mask_NxL, band):
  """The per-step token statistics of a rollout at the sampling policy: the entropy summary,
  the mean Eq. 10 covariance, the mean over the top `COV_TOP_FRACTION` tokens by covariance, and
  the fraction of tokens inside Clip-Cov's band (lb, ub) = `band`."""
  out = {f"entropy/{k}": v for k, v in entropy_summary(entropy_NxL, mask_NxL).items()}
  cov_NxL = token_covariance(logp_NxL, adv_NxL, mask_NxL)
  valid_NxL = mask_NxL > 0
  n = jnp.sum(valid_NxL)
  top_NxL = top_k_mask(cov_NxL, valid_NxL, top_count(COV_TOP_FRACTION, n))
  out["cov/mean"] = masked_mean(cov_NxL, valid_NxL)
  out["cov/topk_mean"] = masked_mean(cov_NxL, top_NxL)
  out["cov/frac_in_band"] = masked_mean((cov_NxL > band[0]) & (cov_NxL < band[1]), valid_NxL)
  return out
