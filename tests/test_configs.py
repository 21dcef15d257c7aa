"""Every config file and preset builds and validates; every tiny preset runs an update step."""

import dataclasses
import importlib

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from entropy_rl import checkpoint, config_lib, models, sharding, step as step_lib
from tests import test_step

FAMILIES = ("default", "grpo", "clip_higher", "clip_cov", "kl_cov", "top_entropy")  # EM / HE
METHODS = ("gspo", "cispo", "archer", "adaptive_entropy", "entropy_advantage", "w_reinforce", "qae")
TINY = (
    [(f, "tiny") for f in FAMILIES + METHODS]
    + [("top_entropy", f"tiny,{m}") for m in ("bottom", "random", "quantile")]
    + [("clip_cov", "tiny,random")]
)
PAPER = [(f, m) for f in FAMILIES[1:] + METHODS for m in config_lib.PAPER_MODELS]


def _get(family, arg):
  return importlib.import_module(f"configs.{family}").get_config(arg)


@pytest.mark.parametrize("family,arg", TINY + PAPER)
def test_preset_builds_and_validates(family, arg):
  c = _get(family, arg)
  config_lib.validate(c, num_devices=8)
  if arg.startswith("qwen"):
    assert c.model.source == "hf" and c.eval.files == config_lib.BENCHMARKS
    if family in FAMILIES:
      assert c.loss.kl_ref_coef == 0 and c.loss.entropy_coef == 0  # EM: no KL, no entropy loss


def test_paper_settings():
  em = _get("grpo", "qwen2_5_7b")
  assert (em.rollout.prompts_per_step, em.rollout.num_samples, em.rl.num_minibatches) == (256, 8, 8)
  assert em.optim.lr == 1e-6 and em.rollout.max_new_tokens == 8192
  assert _get("grpo", "qwen2_5_32b").optim.lr == 5e-7
  assert _get("clip_higher", "qwen2_5_7b").loss.clip_ratio_high == 0.28
  cc = _get("clip_cov", "qwen2_5_7b").loss
  assert (cc.clip_cov_ratio, cc.clip_cov_lb, cc.clip_cov_ub) == (2e-4, 1.0, 5.0)
  assert _get("kl_cov", "qwen2_5_7b").loss.kl_cov_ratio == 2e-3
  assert _get("kl_cov", "qwen2_5_32b").loss.kl_cov_ratio == 2e-4
  he = _get("top_entropy", "qwen3_8b")
  assert he.loss.token_mask == "top_entropy" and he.loss.token_mask_rho == 0.2
  assert he.rl.dynamic_sampling and he.rollout.num_samples == 16
  assert _get("top_entropy", "qwen3_8b,bottom").loss.token_mask == "bottom_entropy"
  assert _get("clip_cov", "qwen2_5_7b,random").loss.clip_cov_tokens == "random"
  assert _get("clip_cov", "qwen2_5_7b").loss.clip_cov_tokens == "band"
  with pytest.raises(ValueError, match="clip_cov.py:tiny,top"):
    _get("clip_cov", "tiny,top")
  with pytest.raises(ValueError, match="token mask"):
    _get("top_entropy", "tiny,middle")


@pytest.mark.parametrize("arg", ["tiny", "qwen2_5_7b", "qwen3_8b"])
def test_method_settings(arg):
  g = _get("gspo", arg).loss
  assert (g.name, g.clip_ratio_low, g.clip_ratio_high, g.loss_agg_mode) == (
      "gspo",
      3e-4,
      4e-4,
      "seq-mean-token-mean",
  )
  cs = _get("cispo", arg).loss
  assert (cs.name, cs.clip_ratio_low, cs.clip_ratio_high) == ("cispo", 1.0, 0.2)
  ar = _get("archer", arg).loss
  assert (ar.name, ar.archer_entropy_quantile, ar.entropy_quantile_scope) == (
      "archer",
      0.8,
      "response",
  )
  assert (ar.clip_ratio_low, ar.archer_high_clip_ratio_low, ar.kl_ref_coef) == (0.2, 0.5, 1e-3)
  ae = _get("adaptive_entropy", arg).loss
  assert ae.adaptive_entropy and ae.entropy_coef == 0.0
  if arg != "tiny":
    assert (ae.entropy_target, ae.entropy_coef_delta, ae.entropy_coef_max) == (0.2, 0.005, 1.0)
  ea = _get("entropy_advantage", arg).loss
  assert (ea.entropy_adv_alpha, ea.entropy_adv_kappa) == (0.4, 2.0)
  wr = _get("w_reinforce", arg)
  assert (wr.loss.positive_adv_weight, wr.rl.advantage) == (0.1, "signed")
  assert not wr.rl.dynamic_sampling  # it would drop the all-wrong groups NSR pushes down
  assert _get("w_reinforce", arg + ",grpo").rl.advantage == "grpo"
  with pytest.raises(ValueError, match=r"w_reinforce.py:tiny,rloo: advantage 'rloo'"):
    _get("w_reinforce", "tiny,rloo")
  q = _get("qae", arg)
  assert (q.rl.advantage, q.rl.qae_quantile) == ("qae", 0.4)


def test_typed_config_carries_every_value_it_reads():
  c = _get("top_entropy", "qwen3_8b")
  c.loss.clip_cov_lb = 2  # an override as the CLI gives it
  run = config_lib.typed(c, num_devices=64)
  loss = dataclasses.asdict(run.update.loss)
  assert loss.pop("selection_shards") == 64 // c.mesh.tensor  # mesh.fsdp = -1 takes the rest
  assert loss.pop("max_response_len") == c.rollout.max_new_tokens == 20480
  assert loss == c.loss.to_dict()
  assert run.update.loss.clip_cov_lb == 2.0
  assert dataclasses.asdict(run.optim) == c.optim.to_dict()
  assert dataclasses.asdict(run.mesh) == c.mesh.to_dict()
  rollout = dataclasses.asdict(run.rollout)
  assert {k: rollout[k] for k in c.rollout} == c.rollout.to_dict()
  assert (
      run.rollout.max_prompt_len,
      run.rollout.dynamic_sampling,
      run.rollout.dynamic_sampling_max_draws,
      run.rollout.filter_groups_metric,
      run.rollout.reward_timeout_s,
  ) == (1024, True, 3, "acc", 5.0)
  assert dataclasses.asdict(run.eval) == {k: c.eval[k] for k in dataclasses.asdict(run.eval)}
  update = dataclasses.asdict(run.update)
  assert {k: update[k] for k in update if k in c.rl} == {k: c.rl[k] for k in update if k in c.rl}
  assert run.update.temperature == c.rollout.temperature and run.update.num_minibatches == 16
  assert hash(run) == hash(config_lib.typed(c, 64))  # usable as a static jit argument
  with pytest.raises(dataclasses.FrozenInstanceError):
    run.optim.lr = 1.0


def test_unknown_loss_option_is_a_config_error():
  c = config_lib.base_config()
  c.loss.clip_ratio = 0.2
  with pytest.raises(
      config_lib.ConfigError, match=r"config\.loss\.clip_ratio is not a loss option"
  ):
    config_lib.validate(c, num_devices=8)


def _tiny(family, arg="tiny"):
  c = _get(family, arg)
  small = test_step._config()
  c.rollout.prompts_per_step, c.rollout.num_samples = 4, 4
  c.rl, c.optim = small.rl, small.optim
  return c


def _ref_batch():
  batch = test_step._batch()
  return batch.replace(ref_logp=(batch.old_logp * 0.9).astype(np.float32))


# grpo and clip_higher run in test_step.py; bottom/random share top_entropy's code path.
@pytest.mark.parametrize(
    "family,arg",
    [
        ("clip_cov", "tiny"),
        ("clip_cov", "tiny,random"),
        ("kl_cov", "tiny"),
        ("top_entropy", "tiny"),
        ("top_entropy", "tiny,quantile"),
        ("gspo", "tiny"),
        ("cispo", "tiny"),
        ("archer", "tiny"),
        ("entropy_advantage", "tiny"),
        ("w_reinforce", "tiny"),
        ("w_reinforce", "tiny,grpo"),
    ],
)
def test_tiny_preset_runs_an_update_step(family, arg):
  c = _tiny(family, arg)
  batch = _ref_batch()
  if family == "gspo":  # sequence ratios ~e^-2.9 < 1 - 3e-4: clipped where A < 0
    batch.advantages[:8] *= -1.0
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  state, m = test_step._run(c, mesh, batch)
  assert m["nonfinite"] == 0 and np.isfinite(m["loss"]) and m["grad_norm"] > 0
  if c.loss.token_mask != "all":
    assert m["n_token_mask"] < m["n_valid"]
  if family == "archer":
    assert 0 < m["n_high_entropy"] < m["n_valid"] and m["kl_ref"] > 0
  if family == "gspo":
    assert m["clipfrac_high"] + m["clipfrac_low"] > 0


def _adaptive_update(c, mesh):
  """(initial state, jitted update, abstract state) with the entropy-control fields."""
  model, cfg, params = test_step._model()
  rules = sharding.default_rules()
  run = config_lib.typed(c)
  optimizer = step_lib.make_optimizer(run.optim, 10)
  schedule = step_lib.lr_schedule(run.optim, 10)
  pshard = sharding.logical_to_mesh_sharding(models.param_logical_axes(cfg), mesh, rules, params)
  params = jax.device_put(params, pshard)
  init = lambda p: step_lib.TrainState.create(p, optimizer.init(p), run.update.loss)
  abstract = jax.eval_shape(init, params)
  replicated = NamedSharding(mesh, P())
  shardings = step_lib.state_shardings(abstract, optimizer, mesh, pshard).replace(
      entropy_coef=replicated, entropy_last=replicated
  )
  state = jax.jit(init, out_shardings=shardings)(params)
  update = step_lib.make_update(model, cfg, run.update, optimizer, schedule, mesh, shardings, rules)
  return (
      state,
      update,
      jax.tree.map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
      ),
  )


@pytest.mark.parametrize("target", [100.0, 0.0])
def test_adaptive_entropy_coefficient_is_run_state(tmp_path, target):
  """One optimizer step per update: the coefficient follows c' = clip(c +- delta) from each step's
  measured entropy, the bonus -c H applies from the step after a measurement <= target, and a
  checkpointed state resumes exactly."""
  c = _tiny("adaptive_entropy")
  c.rl.num_minibatches = 1
  c.loss.entropy_coef, c.loss.entropy_target, c.loss.entropy_coef_delta = 0.02, target, 0.01
  c.loss.entropy_coef_min, c.loss.entropy_coef_max = 0.005, 0.045
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  state, update, abstract = _adaptive_update(c, mesh)
  batch = jax.device_put(test_step._batch(), sharding.batch_sharding(mesh))
  coef, last, states = 0.02, np.inf, []
  for i in range(3):
    state, m = update(state, batch, jax.random.key(i))
    m = jax.device_get(m)
    applied = coef if last <= target else 0.0
    h = float(m["entropy_last"])
    np.testing.assert_allclose(m["entropy_bonus_coef"], applied, rtol=1e-6)
    np.testing.assert_allclose(m["loss"] - m["pg_loss"], -applied * h, rtol=1e-4, atol=1e-7)
    coef = min(coef + 0.01, 0.045) if h <= target else max(coef - 0.01, 0.005)
    last = h
    np.testing.assert_allclose(m["entropy_coef"], coef, rtol=1e-6)
    assert float(state.entropy_coef) == np.float32(m["entropy_coef"])
    states.append(jax.device_get(state))
  assert coef == (0.045 if target > 0 else 0.005)

  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(2, states[1], {})
  restored, _ = ckpt.restore(abstract_state=abstract)
  ckpt.close()
  assert float(restored.entropy_coef) == float(states[1].entropy_coef)
  assert float(restored.entropy_last) == float(states[1].entropy_last)
  resumed, _ = update(restored, batch, jax.random.key(2))
  test_step._close(jax.device_get(resumed), states[2], tol=0)
