"""analysis.py on synthetic data with known answers."""

import numpy as np
import pytest

from entropy_rl import analysis


def test_fit_law_recovers_parameters():
  h = np.linspace(0.1, 1.0, 50)
  r = analysis.law(h, 0.3, 0.9)
  fit = analysis.fit_law(h, r)
  assert fit["a"] == pytest.approx(0.3, abs=1e-6)
  assert fit["b"] == pytest.approx(0.9, abs=1e-6)
  assert fit["ceiling"] == pytest.approx(0.6, abs=1e-6)
  assert fit["r2"] == pytest.approx(1.0, abs=1e-9)
  assert fit["rmse"] == pytest.approx(0.0, abs=1e-7)
  assert fit["n"] == 50


def test_fit_law_noise_lowers_r2_and_skips_nan():
  rng = np.random.default_rng(0)
  h = np.linspace(0.1, 1.0, 200)
  r = analysis.law(h, 0.3, 0.9) + rng.normal(0, 0.05, h.shape)
  r[3] = np.nan
  fit = analysis.fit_law(h, r)
  assert fit["n"] == 199
  assert 0.5 < fit["r2"] < 0.99
  assert fit["rmse"] == pytest.approx(0.05, abs=0.005)
  assert fit["a"] == pytest.approx(0.3, abs=0.05)


def test_fit_law_bad_input():
  with pytest.raises(ValueError, match="entropy"):
    analysis.fit_law([0.1, 0.2], [0.1, 0.2])
  with pytest.raises(ValueError, match="same length"):
    analysis.fit_law([0.1, 0.2, 0.3], [0.1, 0.2])


def test_r_squared_matches_definition():
  y = np.array([1.0, 2.0, 3.0, 4.0])
  y_hat = np.array([1.1, 1.9, 3.2, 3.8])
  expected = 1 - np.sum((y - y_hat) ** 2) / np.sum((y - y.mean()) ** 2)
  assert analysis.r_squared(y, y_hat) == pytest.approx(expected)
  assert np.isnan(analysis.r_squared([2.0, 2.0], [2.0, 2.0]))


def test_window_means():
  np.testing.assert_allclose(analysis.window_means(np.arange(25.0), 10), [4.5, 14.5, 22.0])


def test_early_fit_prediction_exact_law_predicts_exactly():
  h = np.linspace(1.0, 0.2, 100)
  r = analysis.law(h, 0.2, 0.8)
  out = analysis.early_fit_prediction(h, r, 0.15)
  assert out["n_fit"] == 15 and out["n_pred"] == 85
  assert out["rmse"] == pytest.approx(0.0, abs=1e-6)


def test_early_fit_prediction_reports_the_extrapolation_error():
  h = np.linspace(1.0, 0.2, 100)
  r = analysis.law(h, 0.2, 0.8)
  r[15:] += 0.05  # the later points sit 0.05 above the early law
  out = analysis.early_fit_prediction(h, r, 0.15)
  assert out["rmse"] == pytest.approx(0.05, abs=1e-6)
  assert out["mae"] == pytest.approx(0.05, abs=1e-6)


def test_early_fit_prediction_se_is_the_spread_of_its_prediction():
  """`last_se` (the fit's covariance through the law) matches the Monte Carlo spread of the
  prediction at the last point, and shrinks as the fit sees a wider span of entropy."""
  rng = np.random.default_rng(0)
  h = np.linspace(0.18, 0.06, 24)
  sigma = analysis.accuracy_se(analysis.law(h, 1.3, 1.8), 1024)
  preds, ses = [], []
  for _ in range(400):
    r = analysis.law(h, 1.3, 1.8) + rng.normal(0, sigma)
    out = analysis.early_fit_prediction(h, r, 0.3, sigma=sigma)
    preds.append(out["last_error"] + r[-1])
    ses.append(out["last_se"])
  assert np.std(preds) == pytest.approx(np.mean(ses), rel=0.1)
  assert np.mean(preds) == pytest.approx(analysis.law(h[-1], 1.3, 1.8), abs=0.01)
  narrow = analysis.early_fit_prediction(h, analysis.law(h, 1.3, 1.8), 0.15, sigma=sigma)
  assert narrow["last_se"] > 2 * np.mean(ses) and abs(narrow["last_error"]) < 1e-6
  assert "last_se" not in analysis.early_fit_prediction(h, analysis.law(h, 1.3, 1.8), 0.3)


def test_moving_average():
  np.testing.assert_allclose(analysis.moving_average([1.0, 3.0, 5.0, 7.0], 2), [1, 2, 4, 6])


def _plateau_draws(mean_fn, num_steps, every, sigma, num_seeds=1, draws=200, seed=0, **kwargs):
  """detect_plateau on `draws` noisy draws of the curve mean_fn(steps) (Gaussian noise sigma)."""
  rng = np.random.default_rng(seed)
  steps = np.arange(0, num_steps + 1, every, dtype=np.float64)
  shape = (num_seeds, len(steps)) if num_seeds > 1 else (len(steps),)
  return [
      analysis.detect_plateau(steps, mean_fn(steps) + rng.normal(0, sigma, shape), **kwargs)
      for _ in range(draws)
  ]


def _rising(steps):
  return 0.3 + 0.05 * steps / 100  # +0.05 per 100 steps: still learning


def _saturating(tau):
  return lambda steps: 0.3 + 0.3 * (1 - np.exp(-steps / tau))


def _saturation_step(tau, tol=0.02):
  """Where 0.3 (1 - exp(-t / tau)) comes within tol of its limit."""
  return tau * np.log(0.3 / tol)


@pytest.mark.parametrize("num_steps", [500, 1000])
@pytest.mark.parametrize("every,sigma", [(10, 0.03), (10, 0.06), (25, 0.03), (25, 0.06)])
def test_detect_plateau_rising_curve_is_rarely_plateaued(num_steps, every, sigma):
  out = _plateau_draws(_rising, num_steps, every, sigma)
  assert np.mean([o["plateaued"] for o in out]) < 0.1
  assert all(o["step"] is None for o in out if not o["plateaued"])
  # the slope is in absolute units per 100 steps, and its CI covers the truth about as promised
  assert np.median([o["slope"] for o in out]) == pytest.approx(0.05, abs=0.01)
  assert 0.8 < np.mean([o["ci"][0] < 0.05 < o["ci"][1] for o in out]) < 0.97


def test_detect_plateau_a_slope_at_the_tolerance_is_not_plateaued():
  """Two one-sided tests: a curve rising exactly `tol` per 100 steps is plateaued <= 5% of draws."""
  out = _plateau_draws(lambda s: 0.3 + 0.02 * s / 100, 1000, 10, 0.03, draws=300)
  assert np.mean([o["plateaued"] for o in out]) <= 0.08


@pytest.mark.parametrize("num_steps", [500, 1000, 3000])
def test_detect_plateau_noise_free_line_is_rising_at_any_length(num_steps):
  steps = np.arange(0, num_steps + 1, 10.0)
  out = analysis.detect_plateau(steps, _rising(steps))
  assert out["verdict"] == "rising" and not out["plateaued"] and out["step"] is None
  assert out["slope"] == pytest.approx(0.05) and out["sigma"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(
    "num_steps,tau,every,sigma,num_seeds",
    [
        (500, 40, 10, 0.03, 1),
        (500, 40, 10, 0.06, 3),
        (1000, 125, 10, 0.03, 1),
        (1000, 125, 10, 0.06, 1),
        (1000, 125, 25, 0.03, 1),
        (1000, 125, 25, 0.06, 1),
    ],
)
def test_detect_plateau_finds_where_a_saturating_curve_saturates(
    num_steps, tau, every, sigma, num_seeds
):
  out = _plateau_draws(_saturating(tau), num_steps, every, sigma, num_seeds=num_seeds)
  found = [o for o in out if o["plateaued"]]
  assert len(found) > 0.8 * len(out)
  # the plateau step is the centre of a window_steps-wide mean, so it resolves to about half of it
  true = _saturation_step(tau)
  assert abs(np.median([o["step"] for o in found]) - true) < 0.25 * found[0]["window_steps"] + 25
  assert np.median([o["final"] for o in found]) == pytest.approx(0.6, abs=0.01)


def test_detect_plateau_pools_seeds():
  """Three seeds resolve a plateau one seed cannot; a list of runs with their own steps (one seed
  evaluated one step late) pools like the [seeds, points] array."""
  one = _plateau_draws(_saturating(40), 500, 10, 0.06, draws=100, seed=1)
  three = _plateau_draws(_saturating(40), 500, 10, 0.06, num_seeds=3, draws=100, seed=1)
  assert np.mean([o["plateaued"] for o in three]) > np.mean([o["plateaued"] for o in one]) + 0.3
  assert three[0]["num_runs"] == 3 and three[0]["se"] < one[0]["se"]
  rng = np.random.default_rng(2)
  steps = [np.arange(0, 501, 10.0), np.arange(0, 501, 10.0), np.arange(1, 502, 10.0)]
  values = [_saturating(40)(s) + rng.normal(0, 0.03, len(s)) for s in steps]
  out = analysis.detect_plateau(steps, values)
  assert out["num_runs"] == 3 and out["plateaued"]
  values[1][-5:] = np.nan  # non-finite points are dropped, the common range shrinks
  assert analysis.detect_plateau(steps, values)["num_runs"] == 3


def test_detect_plateau_falling_and_rel_tol():
  steps = np.arange(0, 1001, 10.0)
  assert analysis.detect_plateau(steps, 1.0 - 0.05 * steps / 100)["verdict"] == "falling"
  # relative to a gain of 0.5, rel_tol = 0.2 allows 0.1 per 100 steps: the line counts as flat
  out = analysis.detect_plateau(steps, _rising(steps), rel_tol=0.2)
  assert out["plateaued"] and out["tol"] == pytest.approx(0.2 * 0.05 * 9, rel=0.05)


def test_detect_plateau_bad_input():
  with pytest.raises(ValueError, match="values"):
    analysis.detect_plateau(np.arange(150.0), np.arange(150.0))  # two 100-step blocks do not fit
  with pytest.raises(ValueError, match="values"):
    analysis.detect_plateau(np.arange(0, 1000, 100.0), np.zeros(10), window=6)
  with pytest.raises(ValueError, match="values"):
    analysis.detect_plateau(np.arange(10.0), np.zeros(11))


def test_frontier_residual():
  h_ref = np.linspace(0.2, 1.0, 40)
  r_ref = analysis.law(h_ref, 0.3, 0.9)
  h = np.array([0.4, 0.5, 1.5])
  r = analysis.law(h, 0.3, 0.9) + 0.02
  out = analysis.frontier_residual(h_ref, r_ref, h, r)
  np.testing.assert_allclose(out["residuals"], 0.02, atol=1e-6)
  assert out["mean"] == pytest.approx(0.02, abs=1e-6)
  assert out["frac_inside"] == pytest.approx(2 / 3)


def test_covariance_by_top_fraction_known_values():
  cov = np.arange(1.0, 1001.0)  # 1000 tokens: 1..1000
  mask = np.ones_like(cov)
  out = analysis.covariance_by_top_fraction(cov, mask, (0.0002, 0.002, 0.02, 1.0))
  assert out[0.0002] == (1000.0, 1)  # at least one token
  assert out[0.002] == (999.5, 2)
  assert out[0.02] == (pytest.approx(np.mean(np.arange(981, 1001))), 20)
  assert out[1.0] == (500.5, 1000)


def test_covariance_by_top_fraction_ignores_invalid():
  cov = np.array([[100.0, 1.0], [2.0, 3.0]])
  mask = np.array([[0, 1], [1, 1]])
  out = analysis.covariance_by_top_fraction(cov, mask, (0.5, 1.0))
  assert out[0.5] == (3.0, 1)
  assert out[1.0] == (2.0, 3)
  with pytest.raises(ValueError, match="shape"):
    analysis.covariance_by_top_fraction(cov, mask[:1], (1.0,))


def test_token_covariance_matches_formula():
  """EM Eq. 10 on NumPy arrays (float64 out, computed by the trainer's float32 formula)."""
  rng = np.random.default_rng(0)
  logp = rng.normal(size=(3, 5))
  adv = rng.normal(size=(3, 5))
  mask = rng.random((3, 5)) > 0.3
  cov = analysis.token_covariance(logp, adv, mask)
  assert isinstance(cov, np.ndarray) and cov.dtype == np.float64
  a, l = adv[mask], logp[mask]
  np.testing.assert_allclose(cov[mask], (a - a.mean()) * (l - l.mean()), rtol=1e-5, atol=1e-6)
  assert np.all(cov[~mask] == 0)


def test_counts_are_exact_for_decimal_fractions():
  """The trainer's count rules: 0.28 * 25 keeps 7 tokens (float64 ceil gives 8)."""
  assert int(np.sum(analysis.top_fraction_mask(np.arange(25.0), np.ones(25), 0.28))) == 7
  cov = np.arange(1.0, 26.0)
  assert analysis.covariance_by_top_fraction(cov, np.ones(25), (0.28,))[0.28] == (22.0, 7)
  assert (
      analysis.early_fit_prediction(np.linspace(1, 0, 25), np.linspace(0, 1, 25), 0.28)["n_fit"]
      == 7
  )


def test_top_fraction_mask_and_overlap():
  scores = np.array([[0.9, 0.1, 0.5, 0.3, 5.0]])
  mask = np.array([[1, 1, 1, 1, 0]])
  top = analysis.top_fraction_mask(scores, mask, 0.5)  # ceil(0.5 * 4) = 2 of the valid ones
  np.testing.assert_array_equal(top, [[True, False, True, False, False]])
  other = np.array([[True, True, False, False, False]])
  assert analysis.overlap(top, other) == 0.5
  assert analysis.overlap(top, top) == 1.0


def test_pearson():
  x = np.arange(10.0)
  assert analysis.pearson(x, 2 * x + 1) == pytest.approx(1.0)
  assert analysis.pearson(x, -x) == pytest.approx(-1.0)
  assert np.isnan(analysis.pearson([1.0, 2.0], [1.0, 2.0]))


def test_first_order_entropy_change_matches_finite_difference():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(6, 11))
  dz = rng.normal(size=(6, 11))
  for eps in (1e-3, 1e-4):
    exact = analysis.entropy_of_logits(z + eps * dz) - analysis.entropy_of_logits(z)
    pred = analysis.first_order_entropy_change(z, z + eps * dz)
    np.testing.assert_allclose(pred, exact, rtol=20 * eps, atol=1e-12)


def test_entropy_of_logits_uniform():
  np.testing.assert_allclose(analysis.entropy_of_logits(np.zeros((2, 8))), np.log(8))


def test_noise_r2_ceiling_matches_the_r2_of_the_true_curve():
  rng = np.random.default_rng(0)
  steps = np.arange(3000)
  trend = 0.1 + 0.3 * (1 - np.exp(-steps / 800))
  r2s, ceilings = [], []
  for _ in range(20):
    r = trend + rng.normal(0, 0.06, len(steps))
    c = analysis.noise_r2_ceiling(r, 10)
    assert abs(c["sigma"] - 0.06) < 0.003
    r2s.append(analysis.r_squared(analysis.window_means(r, 10), analysis.window_means(trend, 10)))
    ceilings.append(c["ceiling"])
  assert abs(np.mean(r2s) - np.mean(ceilings)) < 0.01
  assert 0.5 < np.mean(ceilings) < 0.95


def test_noise_r2_ceiling_bad_input():
  with pytest.raises(ValueError, match="at least 20"):
    analysis.noise_r2_ceiling(np.ones(15), 10)


def test_law_hint_recovers_the_ceiling():
  h = np.linspace(0.6, 0.2, 60)
  r = -0.3 * np.exp(h) + 0.7 + np.random.default_rng(0).normal(0, 0.005, 60)
  hint = analysis.law_hint(np.stack([h, r], 1).tolist(), 60)
  assert abs(hint["law/ceiling"] - 0.4) < 0.02 and hint["law/r2"] > 0.95
  assert analysis.law_hint([[0.5, 0.1]] * 29, 29) == {}  # fewer than 3 windows of 10 steps


def test_weighted_law_fit_passes_chi2_on_its_own_noise_and_fails_on_a_wrong_curve():
  rng = np.random.default_rng(0)
  h = np.linspace(0.9, 0.1, 40)
  sigma = analysis.accuracy_se(-0.3 * np.exp(h) + 0.8, 1024)
  p_values = []
  for _ in range(200):
    r = -0.3 * np.exp(h) + 0.8 + rng.normal(0, sigma)
    p_values.append(analysis.fit_law(h, r, sigma=sigma)["p_value"])
  assert 0.02 < np.mean(np.asarray(p_values) < 0.05) < 0.09  # ~5% false rejections
  bent = -0.3 * np.exp(h) + 0.8 + 0.1 * np.sin(6 * h)  # not of the law's form
  fit = analysis.fit_law(h, bent + rng.normal(0, sigma), sigma=sigma)
  assert fit["p_value"] < 1e-6 and fit["dof"] == 38
  assert "chi2" not in analysis.fit_law(h, bent)


def test_law_fit_counts_the_entropys_noise():
  """A one-batch entropy is noisy too: the test that counts only the reward's error rejects the
  law it was drawn from; with the entropy's error (effective variance) it rejects ~5%."""
  rng = np.random.default_rng(0)
  h_true = np.tile(np.linspace(0.18, 0.05, 24), 3)
  run = np.repeat([0, 1, 2], 24)
  r_true = -1.3 * np.exp(h_true) + 1.8
  sigma, sigma_h = analysis.accuracy_se(r_true, 1024), 0.0075
  plain, counted, per_run, a = [], [], [], []
  for _ in range(200):
    h = h_true + rng.normal(0, sigma_h, h_true.shape)
    r = r_true + rng.normal(0, sigma)
    plain.append(analysis.fit_law(h, r, sigma=sigma)["p_value"])
    fit = analysis.fit_law(h, r, sigma=sigma, entropy_sigma=sigma_h)
    counted.append(fit["p_value"])
    a.append(fit["a"])
    per_run.append(analysis.fit_law_per_run(h, r, run, sigma, sigma_h)["p_value"])
  assert np.mean(np.asarray(plain) < 0.05) > 0.5
  assert 0.01 < np.mean(np.asarray(counted) < 0.05) < 0.12
  assert 0.01 < np.mean(np.asarray(per_run) < 0.05) < 0.12
  assert abs(np.median(a) - 1.3) < 0.2
  h = h_true + rng.normal(0, sigma_h, h_true.shape)
  bent = r_true + 0.05 * np.sin(60 * h_true) + rng.normal(0, sigma)  # not of the law's form
  assert analysis.fit_law(h, bent, sigma=sigma, entropy_sigma=sigma_h)["p_value"] < 1e-4
  exact = analysis.fit_law(h, r_true, sigma=sigma, entropy_sigma=0.0)
  assert exact["chi2"] == analysis.fit_law(h, r_true, sigma=sigma)["chi2"]
  with pytest.raises(ValueError, match="needs sigma"):
    analysis.fit_law(h, r_true, entropy_sigma=sigma_h)


def test_step_noise_is_the_noise_around_a_slow_trend():
  rng = np.random.default_rng(0)
  trend = 0.18 * np.exp(-np.arange(600) / 200)
  for sd in (0.002, 0.0075, 0.02):
    est = analysis.step_noise(trend + rng.normal(0, sd, 600))
    assert abs(est / sd - 1) < 0.1
  assert analysis.step_noise(np.r_[trend, np.nan]) < 1e-3
  with pytest.raises(ValueError, match="at least 3"):
    analysis.step_noise([0.1, np.nan, 0.2])


def test_law_per_run_separates_run_offsets_from_the_laws_shape():
  rng = np.random.default_rng(0)
  h = np.tile(np.linspace(0.9, 0.1, 24), 3)
  run = np.repeat([0, 1, 2], 24)
  offset = np.array([-0.03, 0.04, 0.0])[run]  # each seed settles at its own level
  sigma = analysis.accuracy_se(-0.3 * np.exp(h) + 0.8, 1024)
  r = -0.3 * np.exp(h) + 0.8 + offset + rng.normal(0, sigma)
  assert analysis.fit_law(h, r, sigma=sigma)["p_value"] < 1e-3  # pooled: the offsets fail it
  fit = analysis.fit_law_per_run(h, r, run, sigma)
  assert fit["p_value"] > 0.05 and fit["dof"] == 72 - 4 and fit["n"] == 72
  assert abs(fit["a"] - 0.3) < 0.02
  np.testing.assert_allclose(
      [fit["b"][x] for x in (0, 1, 2)], 0.8 + np.array([-0.03, 0.04, 0]), atol=0.01
  )
  bent = -0.3 * np.exp(h) + 0.8 + 0.1 * np.sin(6 * h) + rng.normal(0, sigma)
  assert (
      analysis.fit_law_per_run(h, bent, run, sigma)["p_value"] < 1e-6
  )  # a wrong shape still fails
  with pytest.raises(ValueError, match="at least 5"):
    few = [0, 1, 24, 48]  # 4 points over 3 runs
    analysis.fit_law_per_run(h[few], r[few], run[few], sigma[few])


def test_accuracy_se_is_binomial():
  np.testing.assert_allclose(analysis.accuracy_se(0.3, 1024), np.sqrt(0.21 / 1024))
  assert analysis.accuracy_se(0.0, 100) > 0  # floored, so a weighted fit never divides by 0


def test_paired_difference_matches_the_paired_t_test():
  from scipy import stats as st

  a, b = [0.41, 0.44, 0.39, 0.47], [0.38, 0.40, 0.39, 0.42]
  d = analysis.paired_difference(a, b)
  ref = st.ttest_rel(a, b)
  np.testing.assert_allclose(d["t"], ref.statistic)
  np.testing.assert_allclose(d["p_value"], ref.pvalue)
  np.testing.assert_allclose(d["mean"], np.mean(np.subtract(a, b)))
  assert d["n"] == 4 and np.isnan(analysis.paired_difference([1.0], [0.5])["se"])
  with pytest.raises(ValueError, match="equal-length"):
    analysis.paired_difference([1.0, 2.0], [1.0])
