"""EM section 3 on a tabular softmax bandit, in float64.

First order, H(z + dz) - H(z) = -Cov_{a~pi}(log pi(a), dz_a): vanilla PG (dz = eta * pi * A)
gives -eta Cov(log pi, pi A); natural PG (dz = eta * A) gives -eta Cov(log pi, A).
"""
import numpy as np
import pytest


def softmax(z):
  e = np.exp(z - z.max())
  return e / e.sum()


def entropy(z):
  p = softmax(z)
  return -np.sum(p * np.log(p))


def cov_pi(p, x, y):
  return np.sum(p * x * y) - np.sum(p * x) * np.sum(p * y)


def step(z, reward, eta, natural):
  """One exact PG / NPG step on J = E_pi[r]; returns (z', predicted dH)."""
  p = softmax(z)
  adv = reward - np.sum(p * reward)  # centred: E_pi[A] = 0
  dz = eta * adv if natural else eta * p * adv  # dJ/dz_a = pi_a A_a
  predicted = -eta * cov_pi(p, np.log(p), adv if natural else p * adv)
  return z + dz, predicted


@pytest.mark.parametrize("natural", [False, True])
def test_entropy_change_is_minus_eta_cov_to_first_order(natural):
  rng = np.random.default_rng(0)
  z = rng.normal(size=7) * 1.5
  reward = rng.uniform(size=7)
  etas = 0.2 / 2.0 ** np.arange(6)
  residuals = []
  for eta in etas:
    z_new, predicted = step(z, reward, eta, natural)
    actual = entropy(z_new) - entropy(z)
    assert np.sign(actual) == np.sign(predicted)
    residuals.append(actual - predicted)
    assert abs(actual - predicted) < 0.1 * abs(predicted) * eta / etas[0] + 1e-12
  residuals = np.abs(residuals)
  # O(eta^2): halving eta divides the residual by ~4.
  np.testing.assert_allclose(residuals[1:] / residuals[:-1], 0.25, atol=0.03)
  np.testing.assert_allclose(residuals / etas ** 2, residuals[-1] / etas[-1] ** 2, rtol=0.2)


@pytest.mark.parametrize("natural", [False, True])
def test_sign_cases(natural):
  z = np.array([3.0, 1.0, 0.0, -1.0])
  # A likely action with positive advantage sharpens the policy: entropy falls.
  z_new, predicted = step(z, np.array([1.0, 0.0, 0.0, 0.0]), 0.05, natural)
  assert predicted < 0 and entropy(z_new) < entropy(z)
  # A rare action with positive advantage flattens it: entropy rises.
  z_new, predicted = step(z, np.array([0.0, 0.0, 0.0, 1.0]), 0.05, natural)
  assert predicted > 0 and entropy(z_new) > entropy(z)
