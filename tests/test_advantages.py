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
  np.testing.assert_allclose(advantages.grpo_advantages(r, eps=0.1), np_grpo(r, 0.1),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(advantages.drgrpo_advantages(r), np_drgrpo(r), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(advantages.rloo_advantages(r), np_rloo(r), rtol=1e-5, atol=1e-6)
  for name, fn in (("grpo", np_grpo), ("drgrpo", np_drgrpo), ("rloo", np_rloo)):
    out = advantages.compute_advantages(r, name)
    assert out.shape == r.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, fn(r), rtol=1e-5, atol=1e-6)


def test_uniform_groups_get_zero_advantage(rewards):
  for name in ("grpo", "drgrpo", "rloo"):
    assert np.all(np.asarray(advantages.compute_advantages(rewards, name))[0] == 0)


def test_bad_arguments(rewards):
  with pytest.raises(ValueError, match="estimator"):
    advantages.compute_advantages(rewards, "ppo")
  with pytest.raises(ValueError, match="rewards_PxG"):
    advantages.grpo_advantages(rewards.reshape(-1))
