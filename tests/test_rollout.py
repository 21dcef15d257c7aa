"""Rollout collection: DAPO's group filter on the configured metric; reward faults reported."""

import logging

import jax
import numpy as np
import pytest

from entropy_rl import config_lib, rollout


def _config(metric):
  c = config_lib.base_config()
  c.rollout.prompts_per_step, c.rollout.num_samples = 2, 2
  c.rl.dynamic_sampling, c.rl.dynamic_sampling_max_draws = True, 2
  c.rl.filter_groups_metric = metric
  return config_lib.typed(c).rollout


class _Source:

  def next_batch(self, n):
    return [None] * n


def _fake_generate(draws):
  """Draw 0: group 0 all wrong but with different (overlong-shaped) rewards, group 1 mixed.
  Draw 1: both groups mixed."""

  def generate(params, examples, key, **kw):
    del params, examples, key, kw
    d = len(draws)
    draws.append(d)
    correct = np.array([0, 0, 1, 0] if d == 0 else [1, 0, 0, 1], np.float32)
    rewards = correct + np.array([0, -0.5, 0, 0], np.float32)
    z = np.full((4, 3), d, np.float32)
    return rollout.Rollout(z, z, z, z, z, z, rewards, correct)

  return generate


@pytest.mark.parametrize(
    "metric,draws,kept_draw,kept_correct",
    [
        ("acc", 2, [0, 0, 1, 1], [1, 0, 1, 0]),  # draw 0's all-wrong group replaced from draw 1
        ("reward", 1, [0, 0, 0, 0], [0, 0, 1, 0]),  # kept: its rewards differ by the penalty
    ],
)
def test_dynamic_sampling_filters_on_the_configured_metric(metric, draws, kept_draw, kept_correct):
  r = rollout.Rollouts(_config(metric), None, None, None)
  r.generate = _fake_generate([])
  kept, every, n = r.collect(None, _Source(), jax.random.key(0))
  assert n == draws and len(every.rewards) == 4 * draws
  np.testing.assert_array_equal(kept.tokens[:, 0], kept_draw)
  np.testing.assert_array_equal(kept.correct, kept_correct)


def test_reward_faults_are_counted_and_logged_once(caplog):
  r = rollout.Rollouts(_config("acc"), None, None, None)
  with caplog.at_level(logging.WARNING):
    r._report_faults({"timeouts": 2, "errors": 1, "error_messages": ["ValueError: bad latex"]})
  assert (r.faults.timeouts, r.faults.errors) == (2, 1)
  text = [rec.getMessage() for rec in caplog.records]
  assert len(text) == 2
  assert "2 answers took longer than config.reward.timeout_s=5 s" in text[0]
  assert "failed on 1 answers" in text[1] and "ValueError: bad latex" in text[1]


def _roll(prompt_lens, response_lens, p=8, length=12):
  n = len(prompt_lens)
  pmask = (np.arange(p)[None] >= p - np.asarray(prompt_lens)[:, None]).astype(np.int32)
  mask = (np.arange(length)[None] < np.asarray(response_lens)[:, None]).astype(np.float32)
  rng = np.random.default_rng(0)
  return rollout.Rollout(
      prompt=rng.integers(1, 9, (n, p)) * pmask,
      prompt_mask=pmask,
      tokens=(rng.integers(1, 9, (n, length)) * mask).astype(np.int32),
      mask=mask,
      logp=-mask * 0.5,
      entropy=mask * 0.3,
      rewards=np.zeros(n, np.float32),
      correct=np.zeros(n, np.float32),
  )


def test_trimmed_drops_only_shared_padding_in_buckets():
  r = _roll([3, 5], [2, 6])
  t = r.trimmed(4)
  assert t.prompt.shape == (2, 8) and t.tokens.shape == (2, 8)  # 5 -> 8, 6 -> 8
  t = r.trimmed(2)
  assert t.prompt.shape == (2, 6) and t.tokens.shape == (2, 6)
  np.testing.assert_array_equal(t.prompt, r.prompt[:, 2:])
  np.testing.assert_array_equal(t.prompt_mask.sum(1), r.prompt_mask.sum(1))  # no real token lost
  for f in ("tokens", "mask", "logp", "entropy"):
    np.testing.assert_array_equal(getattr(t, f), getattr(r, f)[:, :6])
  assert t.mask.sum() == r.mask.sum()
  assert r.trimmed(0) is r
  assert r.trimmed(64).tokens.shape == r.tokens.shape  # never past the limits
  assert _roll([3, 3], [0, 0]).trimmed(4).tokens.shape == (2, 4)  # at least one bucket
