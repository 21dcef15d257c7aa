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

import logging
import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as stats_lib

from entropy_rl import stats

log = logging.getLogger(__name__)

TOP_FRACTIONS = (0.0002, 0.002, 0.02, 0.2, 0.5, 1.0)


def law(entropy, a, b):
  """EM Eq. 6: R = -a * exp(H) + b."""
  return -a * np.exp(entropy) + b


def _finite_pairs(x, y, name_x="entropy", name_y="reward"):
  x = np.asarray(x, np.float64).ravel()
  y = np.asarray(y, np.float64).ravel()
  if x.shape != y.shape:
    raise ValueError(
        f"{name_x} and {name_y} must have the same length, got {x.shape} and {y.shape}"
    )
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


def step_noise(values) -> float:
  """The noise standard deviation of a per-step series whose trend moves little from one step to
  the next, from its successive differences: sqrt(var(x[t+1] - x[t]) / 2) over the finite values.

  E.g. a training batch's mean token entropy, a one-batch estimate of the policy's entropy.
  """
  x = np.asarray(values, np.float64).ravel()
  x = x[np.isfinite(x)]
  if len(x) < 3:
    raise ValueError(f"values: need at least 3 finite points, got {len(x)}")
  return math.sqrt(np.var(np.diff(x)) / 2.0)


def _point_sigma(sigma, entropy, reward):
  """`sigma` broadcast to the points and kept where both entropy and reward are finite."""
  ok = np.isfinite(np.asarray(entropy, np.float64)) & np.isfinite(np.asarray(reward, np.float64))
  return np.broadcast_to(np.asarray(sigma, np.float64), np.shape(entropy))[ok]


def _weighted_law_fit(h, r, design, s, sh):
  """Weighted linear least squares of r on `design` (column 0 the law's -exp(H), whose coefficient
  is a): the coefficients, their covariance (X^T W X)^-1 and the errors used.

  `s` is each r's standard error (None: unweighted, no covariance). With `sh`, each entropy's,
  the errors are Orear's effective ones: an entropy error moves the law's value by its slope
  a exp(H), so sqrt(s^2 + (a exp(H) sh)^2), iterated with a to a fixed point.
  """
  if sh is not None and not np.all(sh >= 0):
    raise ValueError("entropy_sigma: every standard error must be non-negative")
  s_eff, a = s, None
  for _ in range(50):
    x = design if s_eff is None else design / s_eff[:, None]
    coef, *_ = np.linalg.lstsq(x, r if s_eff is None else r / s_eff, rcond=None)
    converged = a is not None and abs(coef[0] - a) <= 1e-10 * max(1.0, abs(a))
    a = coef[0]
    if sh is None or converged:
      break
    s_eff = np.sqrt(s**2 + (abs(a) * np.exp(h) * sh) ** 2)
  cov = None if s_eff is None else np.linalg.inv(x.T @ x)
  return coef, cov, s_eff


def fit_law(entropy, reward, sigma=None, entropy_sigma=None) -> dict:
  """Least-squares fit of R = -a exp(H) + b: a, b, R^2, residual RMSE, ceiling (-a + b), n points.

  With `sigma` (the standard error of each reward, a scalar or one per point, e.g. the binomial
  error of a validation accuracy) the fit is weighted by 1 / sigma^2 and also returns the
  goodness-of-fit test against that noise: `chi2` = sum((R - law) / sigma)^2 on `dof` = n - 2 and
  its `p_value` (small: the law misses the curve by more than the noise explains), and the
  covariance `cov` of (a, b). With `entropy_sigma` too (the standard error of each entropy, e.g.
  `step_noise` of a one-batch estimate) the errors are the effective ones (`_weighted_law_fit`):
  the test counts both measurements' noise. The model is linear in (a, b): linear least squares.
  """
  h, r = _finite_pairs(entropy, reward)
  if len(h) < 3:
    raise ValueError(f"entropy: need at least 3 finite (entropy, reward) points, got {len(h)}")
  s = sh = None
  if sigma is not None:
    s = _point_sigma(sigma, entropy, reward)
    if not np.all(s > 0):
      raise ValueError("sigma: every standard error must be positive")
  if entropy_sigma is not None:
    if s is None:
      raise ValueError("entropy_sigma: needs sigma, the reward's standard error")
    sh = _point_sigma(entropy_sigma, entropy, reward)
  design = np.stack([-np.exp(h), np.ones_like(h)], axis=1)
  (a, b), cov, s_eff = _weighted_law_fit(h, r, design, s, sh)
  residual = r - law(h, a, b)
  out = {
      "a": float(a),
      "b": float(b),
      "r2": r_squared(r, law(h, a, b)),
      "rmse": float(np.sqrt(np.mean(residual**2))),
      "ceiling": float(b - a),
      "n": int(len(h)),
  }
  if s is not None:
    chi2, dof = float(np.sum((residual / s_eff) ** 2)), len(h) - 2
    out.update(chi2=chi2, dof=dof, p_value=float(stats_lib.chi2.sf(chi2, dof)), cov=cov.tolist())
  return out


def fit_law_per_run(entropy, reward, run, sigma, entropy_sigma=None) -> dict:
  """Weighted fit of R = -a exp(H) + b_run: one a over all runs, an intercept b per run (`run`: a
  label per point), with the chi-squared test on n - 1 - runs dof (`entropy_sigma`: as in
  `fit_law`).

  Seeds of one method can settle at different levels while sharing the law's shape; pooled in one
  `fit_law` that spread counts against the law. Passing here and failing there says the misfit is
  the runs' offsets, not the shape. The model is linear, so this is weighted linear least squares.
  """
  h, r = np.asarray(entropy, np.float64), np.asarray(reward, np.float64)
  labels = np.asarray(run)[np.isfinite(h) & np.isfinite(r)]
  s = _point_sigma(sigma, h, r)
  sh = None if entropy_sigma is None else _point_sigma(entropy_sigma, h, r)
  h, r = _finite_pairs(h, r)
  runs = list(dict.fromkeys(labels.tolist()))
  if len(h) < len(runs) + 2:
    raise ValueError(f"entropy: need at least {len(runs) + 2} finite points, got {len(h)}")
  if not np.all(s > 0):
    raise ValueError("sigma: every standard error must be positive")
  design = np.column_stack([-np.exp(h)] + [(labels == x).astype(np.float64) for x in runs])
  coef, _, s_eff = _weighted_law_fit(h, r, design, s, sh)
  chi2, dof = float(np.sum(((r - design @ coef) / s_eff) ** 2)), len(h) - 1 - len(runs)
  return {
      "a": float(coef[0]),
      "b": {x: float(b) for x, b in zip(runs, coef[1:])},
      "chi2": chi2,
      "dof": dof,
      "p_value": float(stats_lib.chi2.sf(chi2, dof)),
      "n": int(len(h)),
  }


def accuracy_se(accuracy, num_prompts: int):
  """Binomial standard error of an accuracy measured on `num_prompts` fixed prompts."""
  p = np.clip(np.asarray(accuracy, np.float64), 0.0, 1.0)
  return np.sqrt(np.maximum(p * (1.0 - p), 0.25 / num_prompts) / num_prompts)


def paired_difference(values_a, values_b) -> dict:
  """Method A minus method B over seeds run in pairs (seed i of A against seed i of B): the mean
  difference, its standard error std(d) / sqrt(n), t = mean / se, the two-sided p-value (paired
  t-test, n - 1 dof) and n. With one pair the error is unknown (nan)."""
  a, b = np.asarray(values_a, np.float64), np.asarray(values_b, np.float64)
  if a.shape != b.shape or a.ndim != 1 or not len(a):
    raise ValueError(
        f"values_a / values_b: need two equal-length 1-D series, got {a.shape} / {b.shape}"
    )
  d = a - b
  n = len(d)
  mean = float(d.mean())
  se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
  t = mean / se if se > 0 else (float("nan") if not n > 1 else math.copysign(math.inf, mean))
  p = float(2 * stats_lib.t.sf(abs(t), n - 1)) if n > 1 and math.isfinite(t) else float("nan")
  return {"mean": mean, "se": se, "t": float(t), "p_value": p, "n": n}


def law_hint(points, step: int, window: int = 10, min_windows: int = 3) -> dict:
  """The trainer's early-stopping hint: the law fitted on 10-step means of the (token entropy,
  rollout accuracy) `points` so far; its ceiling -a + b is the accuracy predicted at H = 0.
  Empty before `min_windows` windows or while the fit does not converge."""
  h, r = np.asarray(points, np.float64).T if points else (np.zeros(0), np.zeros(0))
  if len(h) < window * min_windows:
    return {}
  try:
    fit = fit_law(window_means(h, window), window_means(r, window))
  except (RuntimeError, ValueError):
    return {}
  log.info(
      "step %d: entropy-performance law R = -%.3f exp(H) + %.3f (R^2 %.2f) predicts an "
      "accuracy ceiling of %.3f at H = 0; recent accuracy %.3f",
      step,
      fit["a"],
      fit["b"],
      fit["r2"],
      fit["ceiling"],
      float(np.mean(r[-window:])),
  )
  return {"law/a": fit["a"], "law/b": fit["b"], "law/r2": fit["r2"], "law/ceiling": fit["ceiling"]}


def window_means(x, window: int) -> np.ndarray:
  """Means of consecutive non-overlapping windows of `window` points (the last partial one kept)."""
  if window < 1:
    raise ValueError(f"window must be >= 1, got {window}")
  x = np.asarray(x, np.float64)
  return np.array([x[i : i + window].mean() for i in range(0, len(x), window)])


def noise_r2_ceiling(reward, window: int) -> dict:
  """The R^2 a perfect law could reach on `window`-step means of a noisy per-step reward.

  Per-step sampling noise is estimated from consecutive differences (`step_noise`; a slow trend
  barely enters them); window means carry sigma^2 / window of it, so no curve fits
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
      raise ValueError(
          f"need at least {2 * window} finite rewards for {window}-step means; " f"got {len(r)}"
      )
    sigma2s.append(step_noise(r) ** 2)
    means.append(window_means(r, window))
  sigma2 = float(np.mean(sigma2s))
  return {
      "sigma": math.sqrt(sigma2),
      "sigma_mean": math.sqrt(sigma2 / window),
      "ceiling": 1.0 - sigma2 / window / float(np.var(np.concatenate(means))),
  }


def early_fit_prediction(entropy, reward, fit_fraction: float = 0.15, sigma=None) -> dict:
  """EM's test of the law: fit on the first `fit_fraction` of points, predict the rest.

  Returns the early fit (a, b, ceiling, r2 on the fit points), `rmse` and `mae` of the prediction
  on the held-out later points, the last point's error `last_error`, and the number of fit /
  predicted points. With `sigma` (each reward's standard error) the fit is weighted and
  `last_se` is the standard error of its prediction at the last point, the fit's parameter
  covariance propagated through the law: how far a few early points can extrapolate.
  """
  h, r = _finite_pairs(entropy, reward)
  if not 0 < fit_fraction < 1:
    raise ValueError(f"fit_fraction must be in (0, 1), got {fit_fraction}")
  n_fit = max(3, int(stats.kept_count(fit_fraction, len(h))))
  if n_fit >= len(h):
    raise ValueError(f"entropy: {len(h)} points leave nothing to predict after fitting {n_fit}")
  s = None if sigma is None else _point_sigma(sigma, entropy, reward)[:n_fit]
  fit = fit_law(h[:n_fit], r[:n_fit], sigma=s)
  err = law(h[n_fit:], fit["a"], fit["b"]) - r[n_fit:]
  out = {
      **fit,
      "rmse": float(np.sqrt(np.mean(err**2))),
      "mae": float(np.mean(np.abs(err))),
      "last_error": float(err[-1]),
      "n_fit": n_fit,
      "n_pred": int(len(err)),
  }
  if s is not None:
    grad = np.array([-np.exp(h[-1]), 1.0])  # d law / d (a, b)
    out["last_se"] = float(np.sqrt(grad @ np.asarray(fit["cov"]) @ grad))
  return out


def moving_average(x, window: int) -> np.ndarray:
  """Trailing moving average (shorter windows at the start), same length as x."""
  if window < 1:
    raise ValueError(f"window must be >= 1, got {window}")
  x = np.asarray(x, np.float64)
  c = np.concatenate([[0.0], np.cumsum(x)])
  idx = np.arange(1, len(x) + 1)
  lo = np.maximum(idx - window, 0)
  return (c[idx] - c[lo]) / (idx - lo)


def _runs(steps, values) -> list[tuple[np.ndarray, np.ndarray]]:
  """(steps, values) of each run with its finite points, in step order: `values` is one run, a
  [runs, points] array sharing `steps`, or a list of runs (with `steps` shared or one per run)."""
  if np.ndim(values) == 1 and np.ndim(values[0]) == 0:
    values = [values]
  values = [np.asarray(v, np.float64) for v in values]
  if np.ndim(steps) == 1 and np.ndim(steps[0]) == 0:
    steps = [steps] * len(values)
  if len(steps) != len(values):
    raise ValueError(f"values: {len(values)} runs but {len(steps)} step series")
  out = []
  for s, v in zip(steps, values):
    s = np.asarray(s, np.float64)
    if s.shape != v.shape or v.ndim != 1:
      raise ValueError(f"values: each run needs one value per step, got {v.shape} and {s.shape}")
    keep = np.isfinite(v) & np.isfinite(s)
    order = np.argsort(s[keep], kind="stable")
    out.append((s[keep][order], v[keep][order]))
  return out


def detect_plateau(
    steps,
    values,
    *,
    tol: float = 0.02,
    window_steps: float = 100.0,
    window: int = 2,
    confidence: float = 0.9,
    rel_tol: float | None = None,
) -> dict:
  """Whether a curve (pooled over runs) has stopped moving: a two-block test on the last points.

  Blocks: over the last 2W steps of the common range, L = the points in the last W steps and
  P = the W steps before. Slope per 100 steps, pooled over the S runs (equal weight per run):
  `100 * mean_s(mean L_s - mean P_s) / mean_s(mean step of L_s - mean step of P_s)`. Its standard
  error uses the per-point noise sigma^2 = mean of squared second differences / 6 (a linear trend
  cancels), pooled over runs: `var = sigma^2 / S^2 * sum_s (1 / |L_s| + 1 / |P_s|)`, scaled like the
  slope. W is the shortest span of at least `window_steps` steps and `window` points per block
  whose CI half-width is at most tol / 2 (the noise sets it, never the values' trend), or half the
  range when none is. Verdict, with the two-sided `confidence` CI [lo, hi] of the slope: 'plateaued'
  when -tol < lo and hi < tol (with confidence 0.9, two one-sided 5% tests), 'rising' when
  lo > tol, 'falling' when hi < -tol, else 'undetermined'. The plateau step is the first step
  whose centred W-step mean (pooled) lies within tol of the final level (the mean of L): what a
  slope of tol per 100 steps would change in 100 steps. `tol` is absolute per 100 steps; with
  `rel_tol` it is rel_tol * |gain|, the gain being the last minus the first `window_steps` block
  mean (a relative tolerance makes the verdict depend on run length: prefer `tol`). The CI is that
  of the sampling noise about the runs' own curves, not of the spread between runs.

  Returns {'plateaued', 'verdict', 'step' (None unless plateaued), 'slope', 'ci', 'se', 'tol',
  'window_steps', 'final', 'sigma', 'num_runs'}; raises ValueError when a block of W steps would hold
  fewer than `window` points in some run.
  """
  runs = _runs(steps, values)
  if not 0 < confidence < 1 or window < 2 or window_steps <= 0:
    raise ValueError(
        f"need 0 < confidence < 1, window >= 2, window_steps > 0; got {confidence}, "
        f"{window}, {window_steps}"
    )
  if any(len(s) < 3 for s, _ in runs):
    raise ValueError("values: need at least 3 finite points per run")
  start, end = max(s[0] for s, _ in runs), min(s[-1] for s, _ in runs)
  second = np.concatenate([np.diff(v, 2) for _, v in runs])
  sigma = math.sqrt(float(np.mean(second**2)) / 6)
  z = float(stats_lib.norm.ppf(0.5 + confidence / 2))
  dt = float(np.median(np.concatenate([np.diff(s) for s, _ in runs])))

  def blocks(w):
    """Per run: (values of P, values of L, mean step difference), P = (end - 2w, end - w]."""
    out = []
    for s, v in runs:
      last, prev = (s > end - w) & (s <= end), (s > end - 2 * w) & (s <= end - w)
      out.append(
          (
              v[prev],
              v[last],
              float(s[last].mean() - s[prev].mean()) if last.any() and prev.any() else np.nan,
          )
      )
    return out

  def se_of(w):
    b = blocks(w)
    if any(min(len(p), len(l)) < window for p, l, _ in b):
      return b, np.nan
    gap = np.mean([g for _, _, g in b])
    return b, 100 * sigma / len(b) * math.sqrt(sum(1 / len(p) + 1 / len(l) for p, l, _ in b)) / gap

  half = (end - start + dt) / 2  # n points spaced dt span n * dt steps
  w = max(window_steps, dt * window)
  b, se = se_of(w)
  if w > half or not np.isfinite(se):
    raise ValueError(
        f"values: {end - start:g} steps do not hold two blocks of {w:g} steps with "
        f">= {window} points each in every run"
    )
  if rel_tol is not None:
    first = np.mean([v[s <= start + w].mean() for s, v in runs])
    tol = rel_tol * abs(float(np.mean([l.mean() for _, l, _ in b])) - float(first))
  while w + dt <= half and z * se > tol / 2:
    b_next, se_next = se_of(w + dt)
    if not np.isfinite(se_next):
      break
    w, b, se = w + dt, b_next, se_next
  final = float(np.mean([l.mean() for _, l, _ in b]))
  slope = (
      100
      * float(np.mean([l.mean() - p.mean() for p, l, _ in b]))
      / float(np.mean([g for _, _, g in b]))
  )
  lo, hi = float(slope - z * se), float(slope + z * se)
  verdict = (
      "plateaued"
      if -tol < lo and hi < tol
      else "rising"
      if lo > tol
      else "falling"
      if hi < -tol
      else "undetermined"
  )
  step = None
  if (
      verdict == "plateaued"
  ):  # the centre end - w / 2 has the window L itself, so it always qualifies
    centres = np.unique(np.concatenate([s for s, _ in runs] + [[end - w / 2]]))
    for t in centres[(centres - w / 2 >= start) & (centres <= end - w / 2)]:
      level = np.mean([v[(s > t - w / 2) & (s <= t + w / 2)].mean() for s, v in runs])
      if abs(level - final) <= tol:
        step = float(t)
        break
  return {
      "plateaued": verdict == "plateaued",
      "verdict": verdict,
      "step": step,
      "slope": slope,
      "ci": (lo, hi),
      "se": float(se),
      "tol": float(tol),
      "window_steps": float(w),
      "final": final,
      "sigma": sigma,
      "num_runs": len(runs),
  }


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
  return {
      "ref": ref,
      "residuals": res,
      "mean": float(res.mean()) if len(res) else float("nan"),
      "frac_inside": inside,
  }


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
  return np.asarray(
      stats.token_covariance(np.asarray(logp), np.asarray(adv), np.asarray(mask)), np.float64
  )


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
