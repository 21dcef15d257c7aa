"""The pure update step: sharding-invariance, exact gradient accumulation, non-finite skips."""

import jax
import numpy as np
import pytest

from entropy_rl import config_lib, models, sharding, step as step_lib

P_LEN, L_LEN, N = 6, 10, 16


def _config(**loss):
  c = config_lib.base_config()
  c.rollout.prompts_per_step, c.rollout.num_samples = 4, 4
  c.rl.num_minibatches, c.rl.num_microbatches = 2, 1
  c.optim.lr, c.optim.warmup_steps = 1e-2, 0
  c.rl.fused_chunk_size = 16
  c.rollout.max_new_tokens = L_LEN  # the response budget: Dr.GRPO's constant
  for k, v in loss.items():
    c.loss[k] = v
  return c


def _model():
  cfg = models.ModelConfig(
      vocab_size=40,
      hidden_size=32,
      intermediate_size=64,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      head_dim=8,
      tie_word_embeddings=True,
  )
  return models.Decoder(cfg), cfg, models.init_params(cfg, jax.random.key(0))


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  plen = rng.integers(2, P_LEN + 1, N)
  rlen = rng.integers(1, L_LEN + 1, N)
  pmask = (np.arange(P_LEN)[None] >= P_LEN - plen[:, None]).astype(np.int32)
  rmask = (np.arange(L_LEN)[None] < rlen[:, None]).astype(np.float32)
  tokens = rng.integers(1, 40, (N, P_LEN + L_LEN)).astype(np.int32)
  tokens[:, :P_LEN] *= pmask
  tokens[:, P_LEN:] *= rmask.astype(np.int32)
  adv = np.repeat(rng.normal(size=(N // 4, 1)), 4, axis=1).reshape(N)
  return step_lib.Batch(
      tokens=tokens,
      attn_mask=np.concatenate([pmask, rmask.astype(np.int32)], 1),
      response_mask=rmask,
      old_logp=(np.log(rng.uniform(0.05, 0.9, (N, L_LEN))) * rmask).astype(np.float32),
      advantages=(adv[:, None] * rmask).astype(np.float32),
  )


def _run(c, mesh, batch, steps=1):
  model, cfg, params = _model()
  rules = sharding.default_rules()
  run = config_lib.typed(c, mesh.devices.size)
  optimizer = step_lib.make_optimizer(run.optim, 10)
  schedule = step_lib.lr_schedule(run.optim, 10)
  pshard = sharding.logical_to_mesh_sharding(models.param_logical_axes(cfg), mesh, rules, params)
  params = jax.device_put(params, pshard)
  state, shardings = step_lib.init_state(params, optimizer, run.update.loss, mesh, pshard)
  update = step_lib.make_update(model, cfg, run.update, optimizer, schedule, mesh, shardings, rules)
  gbatch = jax.device_put(batch, sharding.batch_sharding(mesh))
  metrics = None
  for i in range(steps):
    state, metrics = update(state, gbatch, jax.random.key(i))
  return jax.device_get(state), jax.device_get(metrics)


def _close(a, b, tol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "loss",
    [
        dict(name="ppo"),
        dict(name="clip_cov", clip_cov_ratio=0.2, clip_cov_lb=-10.0, clip_cov_ub=10.0),
    ],
)
def test_sharded_step_equals_single_device(loss):
  c, batch = _config(**loss), _batch()
  one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  many = sharding.make_mesh(2, 2, 2)
  s1, m1 = _run(c, one, batch, steps=2)
  s8, m8 = _run(c, many, batch, steps=2)
  _close(s1.params, s8.params)
  for k in m1:
    np.testing.assert_allclose(m1[k], m8[k], rtol=1e-5, atol=1e-5, err_msg=k)
  assert int(s8.step) == 2


@pytest.mark.parametrize(
    "mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
)
def test_one_microbatch_equals_four(mode):
  batch = _batch(1)
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  c1 = _config(loss_agg_mode=mode)
  c4 = _config(loss_agg_mode=mode)
  c4.rl.num_microbatches = 4
  s1, m1 = _run(c1, mesh, batch)
  s4, m4 = _run(c4, mesh, batch)
  _close(s1.params, s4.params)
  np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)


@pytest.mark.parametrize(
    "mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
)
def test_padding_columns_change_nothing(mode):
  """The trimmed update (`Rollout.trimmed`) equals the padded one in every aggregation mode:
  4 more left-padding prompt columns and 5 more response columns than the rows use."""
  b = _batch(5)
  pad = lambda x, left, right: np.pad(x, ((0, 0), (left, right)))
  padded = step_lib.Batch(
      tokens=np.concatenate([pad(b.tokens[:, :P_LEN], 4, 0), pad(b.tokens[:, P_LEN:], 0, 5)], 1),
      attn_mask=np.concatenate(
          [pad(b.attn_mask[:, :P_LEN], 4, 0), pad(b.attn_mask[:, P_LEN:], 0, 5)], 1
      ),
      response_mask=pad(b.response_mask, 0, 5),
      old_logp=pad(b.old_logp, 0, 5),
      advantages=pad(b.advantages, 0, 5),
  )
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  # KL-Cov: a deterministic selection (random ones draw over the array's shape, so they differ).
  c = _config(loss_agg_mode=mode, name="kl_cov", kl_cov_ratio=0.2)
  c.rollout.max_new_tokens = L_LEN + 5  # one budget for both
  s1, m1 = _run(c, mesh, b)
  s2, m2 = _run(c, mesh, padded)
  _close(s1.params, s2.params)
  for k in ("loss", "grad_norm", "n_cov_selected", "cov_mass_selected"):
    np.testing.assert_allclose(m1[k], m2[k], rtol=1e-5, atol=1e-7)


def test_global_scope_with_one_microbatch_equals_microbatch_scope():
  batch = _batch(2)
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  kw = dict(token_mask="top_entropy", token_mask_rho=0.3)
  s1, m1 = _run(_config(selection_scope="microbatch", **kw), mesh, batch)
  s2, m2 = _run(_config(selection_scope="global", **kw), mesh, batch)
  _close(s1.params, s2.params)
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)


def test_global_scope_selects_over_the_minibatch():
  """With 4 micro-batches, global scope keeps ceil(rho * n) of the whole mini-batch."""
  batch = _batch(3)
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  c = _config(selection_scope="global", token_mask="top_entropy", token_mask_rho=0.3)
  c.rl.num_microbatches = 4
  _, m = _run(c, mesh, batch)
  mask = batch.response_mask
  minis = [mask[i::2] for i in range(2)]
  expected = np.mean([np.ceil(0.3 * mm.sum()) for mm in minis])
  # n_token_mask is reported per micro-batch; the four micro-batches share the global selection.
  np.testing.assert_allclose(m["n_token_mask"] * 4, expected, rtol=1e-6)


def test_device_scope_selects_over_each_devices_rows():
  """verl's scope on a 2-device mesh: each device keeps ceil(rho * n_d) of its own rows."""
  batch = _batch(1)
  mesh = sharding.make_mesh(1, 2, 1, devices=jax.devices()[:2])
  c = _config(selection_scope="device", token_mask="top_entropy", token_mask_rho=0.3)
  _, m = _run(c, mesh, batch)
  mask = batch.response_mask
  minis = [mask[i::2] for i in range(2)]  # strided mini-batches, each split in two row blocks
  half = len(minis[0]) // 2
  expected = np.mean(
      [np.ceil(0.3 * mm[:half].sum()) + np.ceil(0.3 * mm[half:].sum()) for mm in minis]
  )
  np.testing.assert_allclose(m["n_token_mask"], expected, rtol=1e-6)
  assert expected != np.mean([np.ceil(0.3 * mm.sum()) for mm in minis])  # the scopes differ here


def test_nonfinite_update_is_skipped():
  batch = _batch(4)
  batch.advantages[:2, 0] = np.nan  # rows 0 and 1: one in each strided mini-batch
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  c = _config()
  model, cfg, params = _model()
  state, m = _run(c, mesh, batch)
  assert m["nonfinite"] == 1.0
  _close(state.params, params, tol=0)
  assert int(state.step) == 1


def test_step_with_one_bad_minibatch_is_skipped_whole():
  """Only row 1 (mini-batch 1 of 2) is NaN: mini-batch 0's finite update is undone too."""
  batch = _batch(4)
  batch.advantages[1, 0] = np.nan
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  model, cfg, params = _model()
  state, m = _run(_config(), mesh, batch)
  assert m["nonfinite"] == 1.0
  _close(state.params, params, tol=0)
  assert int(jax.tree.leaves(state.opt_state)[0]) == 0  # Adam's count: no update applied


def test_minibatch_skip_keeps_the_finite_minibatches():
  """rl.skip_nonfinite='minibatch': only row 1 (mini-batch 1 of 2) is NaN, so the state is that
  of mini-batch 0's update alone (the same rows run as one mini-batch), one Adam step."""
  batch = _batch(4)
  batch.advantages[1, 0] = np.nan
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  c = _config()
  c.rl.skip_nonfinite = "minibatch"
  state, m = _run(c, mesh, batch)
  assert m["nonfinite"] == 1.0
  assert int(jax.tree.leaves(state.opt_state)[0]) == 1
  first = _config()
  first.rl.num_minibatches = 1
  ref, m_ref = _run(first, mesh, jax.tree.map(lambda x: x[0::2], batch))
  assert m_ref["nonfinite"] == 0.0
  _close(state.params, ref.params, tol=1e-6)
  _, cfg, params = _model()
  assert not all(
      np.array_equal(a, b) for a, b in zip(*map(jax.tree.leaves, (state.params, params)))
  )


def test_overflowing_learning_rate_leaves_the_state_untouched():
  """lr = 1e30: the first mini-batch's update is finite but the next forward overflows; the
  step is skipped whole, so the parameters stay finite and equal to the start."""
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  c = _config()
  c.optim.lr = 1e30
  model, cfg, params = _model()
  state, m = _run(c, mesh, _batch(6), steps=2)
  assert m["nonfinite"] == 1.0
  _close(state.params, params, tol=0)


def test_recompute_old_logp_reports_sampler_mismatch():
  """Recomputed old log-probs replace the sampler's; the mismatch metric measures the gap."""
  batch = _batch(5)
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  c = _config()
  c.rl.recompute_old_logp = True
  c.rl.num_minibatches = 1  # one mini-batch, so every metric is the on-policy one
  _, m = _run(c, mesh, batch)
  # old_logp in the batch is random, so it differs from the model's log-probs by a lot.
  assert m["mismatch_logp"] > 0.1
  # After recomputation the update is on-policy: ratios are 1, nothing is clipped.
  assert m["abs_dlogp"] < 1e-6
  assert m["clipfrac_low"] == 0 and m["clipfrac_high"] == 0


def test_cpu_update_compiles_its_dots_without_ynnpack():
  """On CPU the update is compiled with `CPU_UPDATE_COMPILER_OPTIONS` (Eigen dots); other jitted
  code keeps XLA:CPU's default, which fuses the same dots into YNNPACK."""
  model, cfg, params = _model()
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  rules = sharding.default_rules()
  run = config_lib.typed(_config(), 1)
  optimizer = step_lib.make_optimizer(run.optim, 10)
  schedule = step_lib.lr_schedule(run.optim, 10)
  pshard = sharding.logical_to_mesh_sharding(models.param_logical_axes(cfg), mesh, rules, params)
  state, shardings = step_lib.init_state(params, optimizer, run.update.loss, mesh, pshard)
  update = step_lib.make_update(model, cfg, run.update, optimizer, schedule, mesh, shardings, rules)
  batch = jax.device_put(_batch(), sharding.batch_sharding(mesh))
  text = update.lower(state, batch, jax.random.key(0)).compile().as_text()
  assert " dot(" in text and "ynn_fusion" not in text
  x = np.ones((N * (P_LEN + L_LEN), cfg.hidden_size), np.float32)
  w = np.ones((cfg.hidden_size, cfg.intermediate_size), np.float32)
  assert "ynn_fusion" in jax.jit(lambda x, w: x @ w).lower(x, w).compile().as_text()
