"""entropy_rl.advantages against float64 NumPy references."""

import numpy as np
import pytest

from entropy_rl import advantages


def np_grpo(r, eps=1e-6):
  r = np.asarray(r, np.float64)
  if r.shape[1] == 1:
    return r / (1.0 + eps)
  return (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + eps)


def np_drgrpo(r):
  r = np.asarray(r, np.float64)
  return r if r.shape[1] == 1 else r - r.mean(1, keepdims=True)


def np_rloo(r):
  r = np.asarray(r, np.float64)
  g = r.shape[1]
  if g == 1:
    return r
  return np.stack([r[:, i] - np.delete(r, i, axis=1).mean(1) for i in range(g)], axis=1)


@pytest.fixture(scope="module")
def rewards():
  rng = np.random.default_rng(0)
  r = rng.integers(0, 2, size=(5, 8)).astype(np.float32)
  r[0] = 1.0  # all agree: zero advantages, no division by zero
  r[1] = rng.normal(size=8)
  return r


@pytest.mark.parametrize("group", [8, 3, 1])
def test_estimators_match_numpy(rewards, group):
  r = rewards[:, :group]
  np.testing.assert_allclose(advantages.grpo_advantages(r), np_grpo(r), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      advantages.grpo_advantages(r, eps=0.1), np_grpo(r, 0.1), rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(advantages.drgrpo_advantages(r), np_drgrpo(r), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(advantages.rloo_advantages(r), np_rloo(r), rtol=1e-5, atol=1e-6)
  for name, fn in (("grpo", np_grpo), ("drgrpo", np_drgrpo), ("rloo", np_rloo)):
    out = advantages.compute_advantages(r, name)
    assert out.shape == r.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, fn(r), rtol=1e-5, atol=1e-6)


def test_signed_is_reinforce_with_rewards_plus_minus_one_and_no_baseline():
  r = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], np.float32)
  out = advantages.compute_advantages(r, "signed")
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out, [[1, -1, -1], [-1, -1, -1], [1, 1, 1]])  # all-wrong: pushed


def test_uniform_groups_get_zero_advantage(rewards):
  for name in ("grpo", "drgrpo", "rloo"):
    assert np.all(np.asarray(advantages.compute_advantages(rewards, name))[0] == 0)


def test_bad_arguments(rewards):
  with pytest.raises(ValueError, match="estimator"):
    advantages.compute_advantages(rewards, "ppo")
  with pytest.raises(ValueError, match="rewards_PxG"):
    advantages.grpo_advantages(rewards.reshape(-1))


def np_qae(r, k, eps=1e-6):
  r = np.asarray(r, np.float64)
  if r.shape[1] == 1:
    return r / (1.0 + eps)
  baseline = np.quantile(r, k, axis=1, method="inverted_cdf", keepdims=True)
  return (r - baseline) / (r.std(1, ddof=1, keepdims=True) + eps)


@pytest.mark.parametrize("group", [8, 3, 1])
@pytest.mark.parametrize("k", [0.4, 0.25, 0.9, 0.0, 1.0])
def test_qae_matches_numpy(rewards, group, k):
  r = rewards[:, :group]
  out = advantages.compute_advantages(r, "qae", qae_quantile=k)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, np_qae(r, k), rtol=1e-5, atol=1e-6)


def test_qae_two_regimes_on_binary_rewards():
  """K = 0.4, G = 10: success rate p <= 0.6 -> only successes move; p > 0.6 -> only failures."""
  r = np.zeros((2, 10), np.float32)
  r[0, :6] = 1.0  # p = 0.6: hard regime, baseline 0
  r[1, :7] = 1.0  # p = 0.7: easy regime, baseline 1
  a = np.asarray(advantages.qae_advantages(r, 0.4))
  assert np.all(a[0, :6] > 0) and np.all(a[0, 6:] == 0)
  assert np.all(a[1, :7] == 0) and np.all(a[1, 7:] < 0)
  r = np.array([[1, 1, 1, 0, 0, 0, 0, 0, 0, 0]], np.float32)  # p = 1 - K exactly: baseline 0
  a = np.asarray(advantages.qae_advantages(r, 0.7))  # 0.7 * 10 = 7.000000000000001 in float64
  assert np.all(a[0, :3] > 0) and np.all(a[0, 3:] == 0)
  with pytest.raises(ValueError, match="quantile"):
    advantages.qae_advantages(r, 1.5)
