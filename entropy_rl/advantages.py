"""Outcome advantages over groups of G responses per prompt, rewards shaped [prompts, group].

A group of one has mean 0 and std 1 (as in verl): its advantage is its reward (GRPO: / (1 + eps));
QAE's baseline of a group of one is likewise 0.
"""

import math

import jax.numpy as jnp

ESTIMATORS = ("grpo", "drgrpo", "rloo", "qae", "signed")


def _rewards(rewards_PxG):
  rewards_PxG = jnp.asarray(rewards_PxG)
  if rewards_PxG.ndim != 2:
    raise ValueError(f"rewards_PxG must be [prompts, group]; got shape {rewards_PxG.shape}")
  return rewards_PxG.astype(jnp.float32)


def _group_mean(rewards_PxG):
  if rewards_PxG.shape[1] == 1:
    return jnp.zeros_like(rewards_PxG)
  return jnp.mean(rewards_PxG, axis=1, keepdims=True)


def _group_std(rewards_PxG):
  if rewards_PxG.shape[1] == 1:
    return jnp.ones_like(rewards_PxG)
  return jnp.std(rewards_PxG, axis=1, keepdims=True, ddof=1)


def grpo_advantages(rewards_PxG, eps=1e-6):
  """GRPO: `(r - mean_g) / (std_g + eps)` with the unbiased (ddof=1) group std."""
  rewards_PxG = _rewards(rewards_PxG)
  return (rewards_PxG - _group_mean(rewards_PxG)) / (_group_std(rewards_PxG) + eps)


def drgrpo_advantages(rewards_PxG):
  """Dr.GRPO: `r - mean_g` (no std normalisation)."""
  rewards_PxG = _rewards(rewards_PxG)
  return rewards_PxG - _group_mean(rewards_PxG)


def rloo_advantages(rewards_PxG):
  """RLOO: `r - mean of the other G - 1 rewards` = G / (G - 1) (r - mean_g)."""
  rewards_PxG = _rewards(rewards_PxG)
  g = rewards_PxG.shape[1]
  if g == 1:
    return rewards_PxG
  return (rewards_PxG - _group_mean(rewards_PxG)) * (g / (g - 1))


def qae_advantages(rewards_PxG, quantile=0.4, eps=1e-6):
  """QAE (arXiv 2509.22611): `(r - Q_K(r_group)) / (std_g + eps)`, GRPO with the mean baseline
  replaced by the group's K-quantile (`quantile`), unbiased std.

  Q_K is the inverted-CDF quantile, the smallest group reward r with #{r_j <= r} >= K * G
  (the ceil(K * G)-th smallest; the smallest for K = 0). With binary rewards and success rate p it
  is 0 when p <= 1 - K (only successes get a nonzero, positive advantage) and 1 otherwise (only
  failures, negative): the paper's two regimes.
  """
  if not 0.0 <= quantile <= 1.0:
    raise ValueError(f"quantile must be in [0, 1]; got {quantile!r}")
  rewards_PxG = _rewards(rewards_PxG)
  g = rewards_PxG.shape[1]
  if g == 1:
    baseline_Px1 = jnp.zeros_like(rewards_PxG)
  else:
    rank = max(math.ceil(round(quantile * g, 9)), 1)  # K * G snapped: 0.4 * 5 is 2, not 2.0000001
    baseline_Px1 = jnp.sort(rewards_PxG, axis=1)[:, rank - 1 : rank]
  return (rewards_PxG - baseline_Px1) / (_group_std(rewards_PxG) + eps)


def signed_advantages(rewards_PxG):
  """REINFORCE with rewards +-1 and no baseline (W-REINFORCE's PSR / NSR, arXiv 2506.01347):
  `2 r - 1`, a correct response (r = 1) +1 and a wrong one (r = 0) -1. Unlike the group-centred
  estimators, a group whose responses are all wrong is still pushed down (NSR's signal)."""
  return 2.0 * _rewards(rewards_PxG) - 1.0


def compute_advantages(rewards_PxG, estimator, *, qae_quantile=0.4):
  """Dispatch on `estimator` in `ESTIMATORS`; `qae_quantile` is QAE's K."""
  if estimator == "signed":
    return signed_advantages(rewards_PxG)
  if estimator == "qae":
    return qae_advantages(rewards_PxG, qae_quantile)
  if estimator == "grpo":
    return grpo_advantages(rewards_PxG)
  if estimator == "drgrpo":
    return drgrpo_advantages(rewards_PxG)
  if estimator == "rloo":
    return rloo_advantages(rewards_PxG)
  raise ValueError(f"estimator must be one of {ESTIMATORS}; got {estimator!r}")
