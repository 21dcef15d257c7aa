"""EM section 3 on a tabular softmax bandit, through the package's theory code.

`analysis.first_order_entropy_change(z, z + dz)` is the first-order change
`H(z + dz) - H(z) ~ -Cov_{a~pi}(log pi(a), dz_a)`: vanilla PG (dz = eta * pi * A, the gradient of
`losses.policy_loss`) gives -eta Cov(log pi, pi A); natural PG (dz = eta * A) gives
-eta Cov(log pi, A), which the token covariance of Eq. 10 (`stats.token_covariance`) estimates from
tokens sampled from pi.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from entropy_rl import analysis, config_lib, losses, stats


def softmax(z):
  e = np.exp(z - z.max())
  return e / e.sum()


def cov_pi(p, x, y):
  return np.sum(p * x * y) - np.sum(p * x) * np.sum(p * y)


def step(z, reward, eta, natural):
  """One exact PG / NPG step on J = E_pi[r]; returns (z', centred advantages)."""
  p = softmax(z)
  adv = reward - np.sum(p * reward)  # E_pi[A] = 0
  return z + (eta * adv if natural else eta * p * adv), adv  # dJ/dz_a = pi_a A_a


@pytest.mark.parametrize("natural", [False, True])
def test_entropy_change_is_minus_eta_cov_to_first_order(natural):
  rng = np.random.default_rng(0)
  z = rng.normal(size=7) * 1.5
  reward = rng.uniform(size=7)
  etas = 0.2 / 2.0 ** np.arange(6)
  residuals = []
  for eta in etas:
    z_new, adv = step(z, reward, eta, natural)
    p = softmax(z)
    predicted = float(analysis.first_order_entropy_change(z[None], z_new[None])[0])
    np.testing.assert_allclose(
        predicted, -eta * cov_pi(p, np.log(p), adv if natural else p * adv), rtol=1e-10
    )
    actual = float(
        analysis.entropy_of_logits(z_new[None])[0] - analysis.entropy_of_logits(z[None])[0]
    )
    assert np.sign(actual) == np.sign(predicted)
    residuals.append(actual - predicted)
    assert abs(actual - predicted) < 0.1 * abs(predicted) * eta / etas[0] + 1e-12
  residuals = np.abs(residuals)
  # O(eta^2): halving eta divides the residual by ~4.
  np.testing.assert_allclose(residuals[1:] / residuals[:-1], 0.25, atol=0.03)
  np.testing.assert_allclose(residuals / etas**2, residuals[-1] / etas[-1] ** 2, rtol=0.2)


@pytest.mark.parametrize("natural", [False, True])
def test_sign_cases(natural):
  z = np.array([3.0, 1.0, 0.0, -1.0])
  h = analysis.entropy_of_logits(z[None])[0]
  # A likely action with positive advantage sharpens the policy: entropy falls.
  z_new, _ = step(z, np.array([1.0, 0.0, 0.0, 0.0]), 0.05, natural)
  assert analysis.first_order_entropy_change(z[None], z_new[None])[0] < 0
  assert analysis.entropy_of_logits(z_new[None])[0] < h
  # A rare action with positive advantage flattens it: entropy rises.
  z_new, _ = step(z, np.array([0.0, 0.0, 0.0, 1.0]), 0.05, natural)
  assert analysis.first_order_entropy_change(z[None], z_new[None])[0] > 0
  assert analysis.entropy_of_logits(z_new[None])[0] > h


def test_policy_loss_gradient_is_the_vanilla_policy_gradient():
  """On-policy, one token per action weighted by pi (advantage V pi_a A_a, token-mean), the PPO
  loss's descent direction in logit space is pi * A: the dz of the vanilla PG step above."""
  rng = np.random.default_rng(1)
  v = 6
  z = rng.normal(size=v)
  _, adv = step(z, rng.uniform(size=v), 1.0, natural=False)
  p = softmax(z)
  weighted_1xV = jnp.asarray(v * p * adv, jnp.float32)[None]
  mask_1xV = jnp.ones((1, v), jnp.float32)

  def loss(z_V):
    logits_1xVxV = jnp.broadcast_to(z_V, (1, v, v))
    logp_1xV, _ = stats.token_logprobs_and_entropy(logits_1xVxV, jnp.arange(v)[None])
    return losses.policy_loss(
        logp_1xV, jax.lax.stop_gradient(logp_1xV), weighted_1xV, mask_1xV, config_lib.LossConfig()
    )[0]

  dz = -np.asarray(jax.grad(loss)(jnp.asarray(z, jnp.float32)))
  np.testing.assert_allclose(dz, p * adv, rtol=1e-4, atol=1e-6)


def test_token_covariance_predicts_the_natural_pg_entropy_change():
  """dH ~ -eta * mean_t Cov_t (Eq. 10 over tokens sampled from pi) for an NPG step."""
  rng = np.random.default_rng(2)
  z = rng.normal(size=7) * 1.5
  reward = rng.uniform(size=7)
  eta = 1e-3
  z_new, adv = step(z, reward, eta, natural=True)
  actual = analysis.entropy_of_logits(z_new[None])[0] - analysis.entropy_of_logits(z[None])[0]
  p = softmax(z)
  actions = rng.choice(len(p), size=200_000, p=p)
  cov_1xN = stats.token_covariance(
      jnp.asarray(np.log(p)[actions], jnp.float32)[None],
      jnp.asarray(adv[actions], jnp.float32)[None],
      jnp.ones((1, len(actions)), jnp.float32),
  )
  predicted = -eta * float(jnp.mean(cov_1xN))
  assert predicted == pytest.approx(actual, rel=0.05)
