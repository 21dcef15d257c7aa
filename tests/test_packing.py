"""Sequence packing: the bins hold every row's tokens, and a packed update is the unpacked one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from entropy_rl import packing, sharding, step as step_lib
from tests import test_step

P_LEN, L_LEN, N = 6, 24, 32


def _batch(seed=0, n=N):
  """Long-tailed responses: most of 1-6 tokens, one in eight 24 (the budget)."""
  rng = np.random.default_rng(seed)
  plen = rng.integers(2, P_LEN + 1, n)
  rlen = np.where(rng.uniform(size=n) < 0.125, L_LEN, rng.integers(1, 7, n))
  pmask = (np.arange(P_LEN)[None] >= P_LEN - plen[:, None]).astype(np.int32)
  rmask = (np.arange(L_LEN)[None] < rlen[:, None]).astype(np.float32)
  tokens = rng.integers(1, 40, (n, P_LEN + L_LEN)).astype(np.int32)
  tokens[:, :P_LEN] *= pmask
  tokens[:, P_LEN:] *= rmask.astype(np.int32)
  adv = np.repeat(rng.normal(size=(n // 4, 1)), 4, axis=1).reshape(n)
  return step_lib.Batch(
      tokens=tokens,
      attn_mask=np.concatenate([pmask, rmask.astype(np.int32)], 1),
      response_mask=rmask,
      old_logp=(np.log(rng.uniform(0.05, 0.9, (n, L_LEN))) * rmask).astype(np.float32),
      advantages=(adv[:, None] * rmask).astype(np.float32),
  )


def _packed(batch, groups, shards):
  return batch.replace(
      packed=packing.pack(batch.tokens, batch.attn_mask, L_LEN, groups=groups, shards=shards)
  )


def test_first_fit_decreasing_fills_bins_without_overlap():
  lengths = np.array([5, 9, 2, 7, 3, 3, 1])
  bins, offsets = packing.first_fit_decreasing(lengths, 10)
  assert bins.max() + 1 == 3  # 30 tokens in bins of 10: 9+1, 7+3, 5+3+2
  for b in range(3):
    spans = sorted((offsets[i], offsets[i] + lengths[i]) for i in np.flatnonzero(bins == b))
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    assert spans[-1][1] <= 10


@pytest.mark.parametrize("groups,shards", [(1, 1), (2, 1), (4, 2)])
def test_bins_hold_each_rows_tokens_positions_and_own_segment(groups, shards):
  b = _batch(1)
  p = packing.pack(b.tokens, b.attn_mask, L_LEN, groups=groups, shards=shards)
  s = P_LEN + L_LEN
  per_device = N // shards // groups
  assert p.tokens.shape == (groups * shards * p.bins, s)
  assert p.bins < per_device  # long tails: fewer bins than rows
  real = b.attn_mask.astype(bool)
  assert (p.segments > 0).sum() == real.sum()  # every real token once, nothing else
  for i in range(N):
    g, d = i % groups, i // (N // shards)
    # The row's bins on its device (whole-batch layout: group g, bin b at g + groups * b).
    rows = [g + groups * (d * p.bins + k) for k in range(p.bins)]
    hits = [(r, np.flatnonzero(p.segments[r] == i + 1)) for r in rows]
    ((r, cols),) = [(r, c) for r, c in hits if len(c)]
    np.testing.assert_array_equal(p.tokens[r, cols], b.tokens[i][real[i]])
    np.testing.assert_array_equal(p.positions[r, cols], np.arange(real[i].sum()))
    # index + 1 is the response token each hidden state predicts, within the device's group bins.
    resp = b.response_mask[i] > 0
    local = p.index[i, resp]
    bins_g = np.stack([p.tokens[r] for r in rows]).reshape(-1)
    np.testing.assert_array_equal(bins_g[local + 1], b.tokens[i, P_LEN:][resp])


def test_pack_rejects_rows_that_do_not_split_evenly_and_holes():
  b = _batch(2)
  with pytest.raises(ValueError, match="row shards"):
    packing.pack(b.tokens, b.attn_mask, L_LEN, groups=3, shards=1)
  holes = b.attn_mask.copy()
  holes[0, P_LEN] = 0  # a response that skips its first token
  holes[0, P_LEN + 1] = 1
  with pytest.raises(ValueError, match="contiguous"):
    packing.pack(b.tokens, holes, L_LEN, groups=1, shards=1)


@pytest.mark.parametrize("chunks", [1, 2, 4, 8])
def test_unpack_reads_every_chunk_of_the_strided_splits(chunks):
  """A value per packed position, unpacked from the whole batch or any row chunk, lands on the
  response tokens' predicting positions."""
  b = _packed(_batch(3), groups=8, shards=2)
  value_QxS = jnp.asarray(b.packed.tokens * 1000 + b.packed.positions, jnp.float32)
  whole = packing.unpack(value_QxS, b.packed)
  values, parts = sharding.split_rows(value_QxS, chunks), sharding.split_rows(b.packed, chunks)
  got = [packing.unpack(values[c], jax.tree.map(lambda x, c=c: x[c], parts)) for c in range(chunks)]
  np.testing.assert_array_equal(sharding.merge_rows(jnp.stack(got)), whole)
  # The predicting position holds the previous token of the row, at position t - 1.
  resp = b.response_mask > 0
  prev_tok = b.tokens[:, P_LEN - 1 : -1]
  starts = b.attn_mask.argmax(1)
  prev_pos = np.arange(P_LEN - 1, P_LEN + L_LEN - 1)[None] - starts[:, None]
  np.testing.assert_array_equal(np.asarray(whole)[resp], (prev_tok * 1000 + prev_pos)[resp])


def test_packed_forward_equals_rows():
  b = _packed(_batch(4), groups=1, shards=1)
  model, cfg, params = test_step._model()
  rows = step_lib.response_logprobs(model, cfg, params, b.replace(packed=None), 1.0, 16)
  packed = step_lib.response_logprobs(model, cfg, params, b, 1.0, 16)
  mask = b.response_mask > 0
  for x, y in zip(rows, packed):
    np.testing.assert_allclose(np.asarray(y)[mask], np.asarray(x)[mask], rtol=1e-5, atol=1e-5)


def _config(micro, **loss):
  c = test_step._config(**loss)
  c.rollout.prompts_per_step, c.rollout.num_samples = 8, 4
  c.rollout.max_new_tokens = L_LEN
  c.rl.num_microbatches = micro
  return c


@pytest.mark.parametrize(
    "mode,micro,loss",
    [
        ("token-mean", 1, dict(name="ppo")),
        ("seq-mean-token-mean", 4, dict(name="gspo", clip_ratio_low=3e-4, clip_ratio_high=4e-4)),
        ("seq-mean-token-sum-norm", 2, dict(name="kl_cov", kl_cov_ratio=0.2)),
        ("token-mean", 2, dict(name="archer", kl_ref_coef=0.0)),
        ("seq-mean-token-sum", 2, dict(entropy_coef=0.01, token_mask="top_entropy")),
    ],
)
def test_packed_update_equals_unpacked(mode, micro, loss):
  b = _batch(5)
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  c = _config(micro, loss_agg_mode=mode, **loss)
  s1, m1 = test_step._run(c, mesh, b, steps=2)
  s2, m2 = test_step._run(c, mesh, _packed(b, groups=2 * micro, shards=1), steps=2)
  test_step._close(s1.params, s2.params, tol=2e-5)
  for k in m1:
    np.testing.assert_allclose(m1[k], m2[k], rtol=2e-5, atol=2e-6, err_msg=k)


def test_packed_update_on_a_mesh_with_global_scope_and_recomputed_logp():
  """Four row shards, each packing its own rows; the no-grad passes read chunks of the bins."""
  b = _batch(6)
  many = sharding.make_mesh(2, 2, 2)
  c = _config(2, selection_scope="global", token_mask="top_entropy", token_mask_rho=0.3)
  c.rl.recompute_old_logp = True
  s1, m1 = test_step._run(c, many, b)
  s2, m2 = test_step._run(c, many, _packed(b, groups=4, shards=4))
  test_step._close(s1.params, s2.params, tol=2e-5)
  for k in m1:
    np.testing.assert_allclose(m1[k], m2[k], rtol=2e-5, atol=2e-6, err_msg=k)
