"""Outcome advantages over groups of G responses per prompt, rewards shaped [prompts, group].

A group of one has mean 0 and std 1 (as in verl): its advantage is its reward (GRPO: / (1 + eps)).
"""
import jax.numpy as jnp

ESTIMATORS = ("grpo", "drgrpo", "rloo")


def _rewards(rewards_PxG):
  rewards_PxG = jnp.asarray(rewards_PxG)
  if rewards_PxG.ndim != 2:
    raise ValueError(f"rewards_PxG must be [prompts, group]; got shape {rewards_PxG.shape}")
  return rewards_PxG.astype(jnp.float32)


def _group_mean(rewards_PxG):
  if rewards_PxG.shape[1] == 1:
    return jnp.zeros_like(rewards_PxG)
  return jnp.mean(rewards_PxG, axis=1, keepdims=True)


def grpo_advantages(rewards_PxG, eps=1e-6):
  """GRPO: `(r - mean_g) / (std_g + eps)` with the unbiased (ddof=1) group std."""
  rewards_PxG = _rewards(rewards_PxG)
  if rewards_PxG.shape[1] == 1:
    std_Px1 = jnp.ones_like(rewards_PxG)
  else:
    std_Px1 = jnp.std(rewards_PxG, axis=1, keepdims=True, ddof=1)
  return (rewards_PxG - _group_mean(rewards_PxG)) / (std_Px1 + eps)


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


def compute_advantages(rewards_PxG, estimator):
  """Dispatch on `estimator` in ('grpo', 'drgrpo', 'rloo')."""
  if estimator == "grpo":
    return grpo_advantages(rewards_PxG)
  if estimator == "drgrpo":
    return drgrpo_advantages(rewards_PxG)
  if estimator == "rloo":
    return rloo_advantages(rewards_PxG)
  raise ValueError(f"estimator must be one of {ESTIMATORS}; got {estimator!r}")
