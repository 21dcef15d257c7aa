"""Analysis of RL runs: the entropy-performance law, plateaus, frontier residuals, covariance tails.

NumPy/SciPy functions of per-step series or per-token arrays (NumPy in, NumPy out); the experiment
scripts in `experiments/` call them on metrics.jsonl records. Token counts and the Eq. 10
covariance are the trainer's own (`stats.top_count`, `stats.kept_count`, `stats.token_covariance`).

- Law (EM Eq. 6): `R = -a * exp(H) + b`; `-a + b` is the predicted reward at H = 0 (the ceiling).
  EM fits on the first ~15% of steps and predicts the rest with about 1% RMSE.
- Frontier residual: a method's reward minus GRPO's fitted law at the method's entropy. On GRPO's
  curve (residual ~ 0) a method spends entropy more slowly; above it, it reaches a better frontier.
- Covariance tail (EM Table 1): mean token covariance of the top 0.02%, 0.2%, 2%, 20%, 50% and all
  valid tokens.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import optimize

from entropy_rl import stats

TOP_FRACTIONS = (0.0002, 0.002, 0.02, 0.2, 0.5, 1.0)


def law(entropy, a, b):
  """EM Eq. 6: R = -a * exp(H) + b."""
  return -a * np.exp(entropy) + b


def _finite_pairs(x, y, name_x="entropy", name_y="reward"):
  x = np.asarray(x, np.float64).ravel()
  y = np.asarray(y, np.float64).ravel()
  if x.shape != y.shape:
    raise ValueError(f"{name_x} and {name_y} must have the same length, got {x.shape} and {y.shape}")
  keep = np.isfinite(x) & np.isfinite(y)
  return x[keep], y[keep]


def r_squared(y, y_hat) -> float:
  """Coefficient of determination 1 - SS_res / SS_tot (nan when y is constant)."""
  y = np.asarray(y, np.float64)
  y_hat = np.asarray(y_hat, np.float64)
  ss_tot = float(np.sum((y - y.mean()) ** 2))
  if ss_tot == 0.0:
    return float("nan")
  return 1.0 - float(np.sum((y - y_hat) ** 2)) / ss_tot


def fit_law(entropy, reward) -> dict:
  """Least-squares fit of R = -a exp(H) + b: a, b, R^2, residual RMSE, ceiling (-a + b), n points.

  The model is linear in (a, b), so the linear least-squares solution seeds `curve_fit`.
  """
  h, r = _finite_pairs(entropy, reward)
  if len(h) < 3:
    raise ValueError(f"entropy: need at least 3 finite (entropy, reward) points, got {len(h)}")
  design = np.stack([-np.exp(h), np.ones_like(h)], axis=1)
  p0, *_ = np.linalg.lstsq(design, r, rcond=None)
  (a, b), _ = optimize.curve_fit(law, h, r, p0=p0)
  residual = r - law(h, a, b)
  return {"a": float(a), "b": float(b), "r2": r_squared(r, law(h, a, b)),
          "rmse": float(np.sqrt(np.mean(residual ** 2))), "ceiling": float(b - a), "n": int(len(h))}


def window_means(x, window: int) -> np.ndarray:
  """Means of consecutive non-overlapping windows of `window` points (the last partial one kept)."""
  if window < 1:
    raise ValueError(f"window must be >= 1, got {window}")
  x = np.asarray(x, np.float64)
  return np.array([x[i:i + window].mean() for i in range(0, len(x), window)])


def noise_r2_ceiling(reward, window: int) -> dict:
  """The R^2 a perfect law could reach on `window`-step means of a noisy per-step reward.

  Per-step sampling noise is estimated from consecutive differences, sigma^2 = var(diff) / 2
  (a slow trend barely enters them); window means carry sigma^2 / window of it, so no curve fits
  them better than 1 - (sigma^2 / window) / var(window means) in expectation. `reward` is one
  run's series, or a list of runs' series pooled as a pooled fit sees them (sigma^2 averaged over
  the runs, the variance taken over all their window means).
  """
  runs = [reward] if np.ndim(reward[0]) == 0 else reward
  sigma2s, means = [], []
  for run in runs:
    r = np.asarray(run, np.float64)
    r = r[np.isfinite(r)]
    if len(r) < 2 * window:
      raise ValueError(f"need at least {2 * window} finite rewards for {window}-step means; "
                       f"got {len(r)}")
    sigma2s.append(np.var(np.diff(r)) / 2)
    means.append(window_means(r, window))
  sigma2 = float(np.mean(sigma2s))
  return {"sigma": math.sqrt(sigma2), "sigma_mean": math.sqrt(sigma2 / window),
          "ceiling": 1.0 - sigma2 / window / float(np.var(np.concatenate(means)))}


def early_fit_prediction(entropy, reward, fit_fraction: float = 0.15) -> dict:
  """EM's test of the law: fit on the first `fit_fraction` of points, predict the rest.

  Returns the early fit (a, b, ceiling, r2 on the fit points), `rmse` and `mae` of the prediction
  on the held-out later points, and the number of fit / predicted points.
  """
  h, r = _finite_pairs(entropy, reward)
  if not 0 < fit_fraction < 1:
    raise ValueError(f"fit_fraction must be in (0, 1), got {fit_fraction}")
  n_fit = max(3, int(stats.kept_count(fit_fraction, len(h))))
  if n_fit >= len(h):
    raise ValueError(f"entropy: {len(h)} points leave nothing to predict after fitting {n_fit}")
  fit = fit_law(h[:n_fit], r[:n_fit])
  err = law(h[n_fit:], fit["a"], fit["b"]) - r[n_fit:]
  return {**fit, "rmse": float(np.sqrt(np.mean(err ** 2))), "mae": float(np.mean(np.abs(err))),
          "n_fit": n_fit, "n_pred": int(len(err))}


def moving_average(x, window: int) -> np.ndarray:
  """Trailing moving average (shorter windows at the start), same length as x."""
  if window < 1:
    raise ValueError(f"window must be >= 1, got {window}")
  x = np.asarray(x, np.float64)
  c = np.concatenate([[0.0], np.cumsum(x)])
  idx = np.arange(1, len(x) + 1)
  lo = np.maximum(idx - window, 0)
  return (c[idx] - c[lo]) / (idx - lo)


def detect_plateau(steps, values, window: int = 20, rel_tol: float = 0.1) -> dict:
  """Where a rising curve stops rising, or None if it is still rising at the end.

  The curve is smoothed with a trailing `window`-point moving average. Let G be the smoothed gain
  (max - first). The run has plateaued if the least-squares slope over the last `window` points,
  times `window`, is below `rel_tol * G`; the plateau step is then the first step where the smoothed
  curve comes within `rel_tol * G` of its maximum. Returns {'step' (or None), 'gain', 'tail_rise',
  'plateaued'}.
  """
  steps = np.asarray(steps, np.float64)
  y = np.asarray(values, np.float64)
  if steps.shape != y.shape or len(y) < 2 * window:
    raise ValueError(f"values: need matching steps and at least 2 * window = {2 * window} points, "
                     f"got {len(y)}")
  s = moving_average(y, window)
  gain = float(s.max() - s[0])
  tail_slope = float(np.polyfit(steps[-window:], y[-window:], 1)[0])
  tail_rise = tail_slope * float(steps[-1] - steps[-window])
  if gain <= 0:
    return {"step": float(steps[0]), "gain": gain, "tail_rise": tail_rise, "plateaued": True}
  plateaued = tail_rise < rel_tol * gain
  step = float(steps[np.argmax(s >= s.max() - rel_tol * gain)]) if plateaued else None
  return {"step": step, "gain": gain, "tail_rise": tail_rise, "plateaued": bool(plateaued)}


def frontier_residual(ref_entropy, ref_reward, entropy, reward) -> dict:
  """Reward minus the reference (GRPO) law fitted on (ref_entropy, ref_reward), at `entropy`.

  Returns the reference fit, per-point residuals, their mean, and the fraction of points whose
  entropy lies inside the reference's entropy range (outside it the residual is extrapolated).
  """
  ref = fit_law(ref_entropy, ref_reward)
  h, r = _finite_pairs(entropy, reward)
  res = r - law(h, ref["a"], ref["b"])
  lo, hi = np.nanmin(ref_entropy), np.nanmax(ref_entropy)
  inside = float(np.mean((h >= lo) & (h <= hi))) if len(h) else float("nan")
  return {"ref": ref, "residuals": res, "mean": float(res.mean()) if len(res) else float("nan"),
          "frac_inside": inside}


def covariance_by_top_fraction(cov, mask, fractions: Sequence[float] = TOP_FRACTIONS) -> dict:
  """EM Table 1: mean covariance of the top `f` fraction of valid tokens by covariance, per f.

  Returns {f: (mean, count)}; a fraction of 1.0 is the mean over all valid tokens.
  """
  cov = np.asarray(cov, np.float64)
  valid = np.asarray(mask) > 0
  if cov.shape != valid.shape:
    raise ValueError(f"cov and mask must have the same shape, got {cov.shape} and {valid.shape}")
  values = np.sort(cov[valid])[::-1]
  if not len(values):
    raise ValueError("mask: no valid tokens")
  out = {}
  for f in fractions:
    if not 0 < f <= 1:
      raise ValueError(f"fractions: each must be in (0, 1], got {f}")
    k = int(stats.top_count(f, len(values)))
    out[f] = (float(values[:k].mean()), k)
  return out


def token_covariance(logp, adv, mask) -> np.ndarray:
  """EM Eq. 10 (`stats.token_covariance`) on NumPy arrays: (A - mean A)(logp - mean logp) over
  valid tokens, 0 elsewhere; computed in float32, returned as float64."""
  return np.asarray(stats.token_covariance(np.asarray(logp), np.asarray(adv), np.asarray(mask)),
                    np.float64)


def top_fraction_mask(scores, mask, rho: float) -> np.ndarray:
  """The ceil(rho * n) valid positions with the highest score (HE Eq. 6's token set), as bools."""
  scores = np.asarray(scores, np.float64)
  valid = np.asarray(mask) > 0
  k = int(stats.kept_count(rho, int(valid.sum())))
  flat = np.where(valid, scores, -np.inf).ravel()
  out = np.zeros(flat.shape, bool)
  if k:
    out[np.argsort(-flat, kind="stable")[:k]] = True
  return out.reshape(scores.shape)


def overlap(mask_a, mask_b) -> float:
  """|A & B| / |A|: the fraction of A's positions also in B (HE Table 1's top-20% overlap)."""
  a = np.asarray(mask_a, bool)
  b = np.asarray(mask_b, bool)
  return float((a & b).sum() / max(int(a.sum()), 1))


def pearson(x, y) -> float:
  """Pearson correlation over finite pairs (nan with fewer than 3 pairs or zero variance)."""
  x, y = _finite_pairs(x, y, "x", "y")
  if len(x) < 3 or x.std() == 0 or y.std() == 0:
    return float("nan")
  return float(np.corrcoef(x, y)[0, 1])


def first_order_entropy_change(logits_old_NxV, logits_new_NxV) -> np.ndarray:
  """EM section 3: H(z + dz) - H(z) ~ -Cov_{a~pi}(log pi(a), dz_a), per row, in float64."""
  z = np.asarray(logits_old_NxV, np.float64)
  dz = np.asarray(logits_new_NxV, np.float64) - z
  logp = z - z.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  p = np.exp(logp)
  e_logp = (p * logp).sum(-1, keepdims=True)
  e_dz = (p * dz).sum(-1, keepdims=True)
  return -(p * (logp - e_logp) * (dz - e_dz)).sum(-1)


def entropy_of_logits(logits_NxV) -> np.ndarray:
  """Softmax entropy in nats per row, float64."""
  z = np.asarray(logits_NxV, np.float64)
  logp = z - z.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  return -(np.exp(logp) * logp).sum(-1)
