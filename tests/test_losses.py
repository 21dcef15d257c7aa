"""entropy_rl.losses against float64 NumPy references, with padding."""

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from entropy_rl import config_lib, losses


def make_cfg(**overrides):
  return config_lib.LossConfig(**overrides)


# ----------------------------------------------------------------------------- NumPy references


def np_cov(logp, adv, mask):
  valid = mask > 0
  lp, a = logp.astype(np.float64), adv.astype(np.float64)
  return np.where(valid, (a - a[valid].mean()) * (lp - lp[valid].mean()), 0.0)


def np_clip_terms(logp, old, adv, cfg, clamp):
  log_ratio = logp.astype(np.float64) - old
  if clamp:
    log_ratio = np.clip(log_ratio, -20, 20)
  ratio = np.exp(log_ratio)
  a = adv.astype(np.float64)
  l1 = -a * ratio
  l2 = -a * np.clip(ratio, 1 - cfg.clip_ratio_low, 1 + cfg.clip_ratio_high)
  return ratio, l1, l2


def np_ppo(logp, old, adv, cfg):
  _, l1, l2 = np_clip_terms(logp, old, adv, cfg, clamp=True)
  l = np.maximum(l1, l2)
  return np.where(adv < 0, np.minimum(l, -adv.astype(np.float64) * cfg.clip_ratio_c), l)


def np_aggregate(l, m, mode, resp=None):
  l, m = np.asarray(l, np.float64), np.asarray(m, np.float64)
  resp = m if resp is None else resp
  rows = int((resp > 0).any(-1).sum())
  lm = np.where(m > 0, l, 0.0) * m
  if mode == "token-mean":
    return lm.sum(), m.sum()
  if mode == "seq-mean-token-sum":
    return lm.sum(), rows
  if mode == "seq-mean-token-mean":
    has = m.sum(-1) > 0
    return (lm.sum(-1)[has] / m.sum(-1)[has]).sum(), rows
  return lm.sum(), rows * l.shape[-1]


def np_top_mask(scores, valid, k):
  flat_s, flat_v = scores.reshape(-1), valid.reshape(-1)
  idx = [i for i in np.argsort(-flat_s, kind="stable") if flat_v[i]][:k]
  keep = np.zeros(flat_s.shape, bool)
  keep[idx] = True
  return keep.reshape(scores.shape)


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  b, t = 8, 12
  lengths = rng.integers(2, t + 1, size=b)
  lengths[0], lengths[5] = t, 0  # a full and an empty (padding) row
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
  logp = np.log(rng.uniform(0.02, 1.0, size=(b, t))).astype(np.float32)
  old = (logp + rng.normal(size=(b, t)) * 0.3).astype(np.float32)
  adv = np.repeat(rng.normal(size=(b, 1)) * 1.5, t, axis=1).astype(np.float32)
  entropy = np.abs(rng.normal(size=(b, t))).astype(np.float32)
  for x in (logp, old, adv, entropy):
    x[mask == 0] = 7.0  # padding garbage must not matter
  return dict(logp=logp, old=old, adv=adv, mask=mask, entropy=entropy)


def _loss_and_grad(b, cfg, **kw):
  def f(logp):
    return losses.policy_loss(logp, b["old"], b["adv"], b["mask"], cfg, **kw)

  (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(b["logp"]))
  return float(loss), metrics, np.asarray(grad)


# ----------------------------------------------------------------------------- config validation


def test_default_config_is_grpo_and_the_config_files_loss_block():
  cfg = config_lib.LossConfig()
  assert config_lib.loss_config(config_lib.base_config().loss) == cfg
  assert cfg.name == "ppo" and cfg.clip_ratio_low == cfg.clip_ratio_high == 0.2
  assert cfg.clip_ratio_c == 3.0 and cfg.clip_cov_ratio == 2e-4 and cfg.kl_cov_ratio == 2e-3
  assert cfg.loss_agg_mode == "token-mean" and cfg.token_mask == "all"
  assert cfg.token_mask_rho == 0.2 and cfg.selection_scope == "microbatch"


@pytest.mark.parametrize(
    "field,value",
    [
        ("name", "grpo"),
        ("clip_ratio_low", -0.1),
        ("clip_ratio_low", 1.5),
        ("clip_ratio_high", -1.0),
        ("clip_ratio_c", 1.0),
        ("clip_cov_ratio", 0.0),
        ("clip_cov_ratio", -2e-4),
        ("clip_cov_ub", 0.5),
        ("clip_cov_tokens", "top"),
        ("kl_cov_ratio", 0.0),
        ("kl_cov_coef", -1.0),
        ("loss_agg_mode", "mean"),
        ("token_mask", "top"),
        ("token_mask_rho", 0.0),
        ("token_mask_rho", 1.2),
        ("selection_scope", "rank"),
        ("selection_shards", 0),
        ("kl_ref_coef", -0.1),
        ("kl_ref_estimator", "k4"),
        ("entropy_coef", float("nan")),
        ("entropy_target", -0.1),
        ("entropy_coef_delta", -0.01),
        ("entropy_coef_min", -1.0),
        ("entropy_coef_max", -1.0),
        ("entropy_adv_alpha", -0.4),
        ("entropy_adv_kappa", 0.0),
        ("positive_adv_weight", -0.1),
        ("archer_entropy_quantile", 1.5),
        ("archer_high_clip_ratio_low", 1.5),
        ("archer_high_clip_ratio_high", -0.5),
        ("entropy_quantile_scope", "batch"),
    ],
)
def test_bad_config_names_the_field(field, value):
  with pytest.raises(ValueError, match=rf"config\.loss\.{field}\b"):
    make_cfg(**{field: value})


def test_adaptive_entropy_initial_coef_must_lie_in_its_bounds():
  with pytest.raises(ValueError, match=r"config\.loss\.entropy_coef\b"):
    make_cfg(adaptive_entropy=True, entropy_coef=0.5, entropy_coef_max=0.1)
  make_cfg(entropy_coef=0.5, entropy_coef_max=0.1)  # not adaptive


def test_bad_arguments_raise_before_tracing(batch):
  b = batch
  block = config_lib.base_config().loss
  block.unknown = 1
  with pytest.raises(ValueError, match=r"config\.loss\.unknown"):
    config_lib.loss_config(block)
  with pytest.raises(ValueError, match="old_logp_BxT"):
    losses.policy_loss(b["logp"], b["old"][:, 1:], b["adv"], b["mask"], make_cfg())
  with pytest.raises(ValueError, match="rng"):
    losses.policy_loss(b["logp"], b["old"], b["adv"], b["mask"], make_cfg(name="clip_cov"))
  with pytest.raises(ValueError, match="rng"):
    losses.select_tokens(b["logp"], b["old"], b["adv"], b["mask"], make_cfg(token_mask="random"))
  with pytest.raises(ValueError, match="entropy_BxT"):
    losses.policy_loss(b["logp"], b["old"], b["adv"], b["mask"], make_cfg(token_mask="top_entropy"))
  with pytest.raises(ValueError, match="entropy_BxT"):
    losses.policy_loss(b["logp"], b["old"], b["adv"], b["mask"], make_cfg(name="archer"))
  with pytest.raises(ValueError, match="entropy_BxT"):
    losses.policy_loss(b["logp"], b["old"], b["adv"], b["mask"], make_cfg(entropy_adv_alpha=0.4))
  with pytest.raises(ValueError, match="ref_logp_BxT"):
    losses.policy_loss(
        b["logp"],
        b["old"],
        b["adv"],
        b["mask"],
        make_cfg(name="archer", kl_ref_coef=0.1),
        entropy_BxT=b["entropy"],
    )
  with pytest.raises(ValueError, match="selections"):
    losses.policy_loss(
        b["logp"],
        b["old"],
        b["adv"],
        b["mask"],
        make_cfg(),
        selections={"token_mask": b["mask"], "cov_selected": b["mask"]},
    )
  with pytest.raises(ValueError, match="num_microbatches"):
    losses.global_denominator(b["mask"], make_cfg(), 3)
  with pytest.raises(ValueError, match="mode"):
    losses.aggregate_loss(b["logp"], b["mask"], "sum")
  with pytest.raises(ValueError, match="estimator"):
    losses.kl_penalty(b["logp"], b["old"], "k5")


# ----------------------------------------------------------------------------- PPO


def test_ppo_matches_numpy_with_clip_higher_dual_clip_and_clamp(batch):
  b = {k: v.copy() for k, v in batch.items()}
  b["old"][0, :3] = b["logp"][0, :3] - np.array([30.0, -30.0, 1.5])  # clamped log-ratios
  b["adv"][2, :] = -2.0
  b["old"][2, :4] = b["logp"][2, :4] - 2.0  # ratio e^2 > c = 3 with A < 0: dual-clip
  cfg = make_cfg(clip_ratio_high=0.28)
  loss, metrics, grad = _loss_and_grad(b, cfg)
  valid = b["mask"] > 0
  n = valid.sum()
  l = np_ppo(b["logp"], b["old"], b["adv"], cfg)
  np.testing.assert_allclose(loss, np.where(valid, l, 0).sum() / n, rtol=1e-5)
  ratio, l1, l2 = np_clip_terms(b["logp"], b["old"], b["adv"], cfg, clamp=True)
  a = b["adv"].astype(np.float64)
  raw = b["logp"].astype(np.float64) - b["old"]
  dual = (a < 0) & (np.maximum(l1, l2) > -a * cfg.clip_ratio_c)
  live = valid & (l1 >= l2) & ~dual & (np.abs(raw) < 20)
  np.testing.assert_allclose(grad, np.where(live, -a * ratio, 0) / n, rtol=1e-5, atol=1e-7)
  assert dual[2, :4].all() and metrics["clipfrac_dual"] > 0
  np.testing.assert_allclose(metrics["clipfrac_dual"], dual[valid].mean(), rtol=1e-6)
  np.testing.assert_allclose(
      metrics["clipfrac_high"], ((a > 0) & (ratio > 1.28))[valid].mean(), rtol=1e-6
  )
  np.testing.assert_allclose(
      metrics["clipfrac_low"], ((a < 0) & (ratio < 0.8))[valid].mean(), rtol=1e-6
  )
  np.testing.assert_allclose(metrics["ppo_kl"], -raw[valid].mean(), rtol=1e-5)
  assert float(metrics["n_cov_selected"]) == 0 and float(metrics["loss_den"]) == n


# ----------------------------------------------------------------------------- Clip-Cov


def _np_clip_cov_candidates(b, cfg):
  _, l1, l2 = np_clip_terms(b["logp"], b["old"], b["adv"], cfg, clamp=False)
  cov = np_cov(b["logp"], b["adv"], b["mask"])
  band = (cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub) & (b["mask"] > 0)
  return band & ~(l2 > l1), band & (l2 > l1)


@pytest.mark.parametrize("ratio", [0.1, 1e-6])
def test_clip_cov_selection_gradient_and_denominator(batch, ratio):
  b = batch
  cfg = make_cfg(name="clip_cov", clip_cov_ratio=ratio, clip_cov_lb=0.2, clip_cov_ub=3.0)
  loss, metrics, grad = _loss_and_grad(b, cfg, rng=jax.random.key(3))
  sel = (
      np.asarray(
          losses.select_tokens(
              b["logp"], b["old"], b["adv"], b["mask"], cfg, rng=jax.random.key(3)
          )["cov_selected"]
      )
      > 0
  )
  candidates, _ = _np_clip_cov_candidates(b, cfg)
  valid = b["mask"] > 0
  n = valid.sum()
  k = min(max(math.floor(ratio * n), 1), candidates.sum())
  assert candidates.sum() > k > 0 and sel.sum() == k and float(metrics["n_cov_selected"]) == k
  assert not (sel & ~candidates).any()
  assert np.all(grad[sel] == 0.0)  # exactly zero
  ratio_, l1, l2 = np_clip_terms(b["logp"], b["old"], b["adv"], cfg, clamp=False)
  live = valid & (l1 >= l2) & ~sel
  np.testing.assert_allclose(grad, np.where(live, -b["adv"] * ratio_, 0) / n, rtol=1e-5, atol=1e-7)
  assert np.all(grad[live] != 0)
  # Loss x 0 on the selected tokens, but they stay in the token-mean denominator.
  assert float(metrics["loss_den"]) == n
  ref = np.where(valid & ~sel, np.maximum(l1, l2), 0).sum() / n
  np.testing.assert_allclose(loss, ref, rtol=1e-5)


def test_clip_cov_never_selects_already_clipped_tokens(batch):
  b = batch
  cfg = make_cfg(name="clip_cov", clip_cov_ratio=1.0, clip_cov_lb=0.05, clip_cov_ub=10.0)
  candidates, clipped_in_band = _np_clip_cov_candidates(b, cfg)
  assert clipped_in_band.sum() > 0 and candidates.sum() > 0
  sel = losses.select_tokens(b["logp"], b["old"], b["adv"], b["mask"], cfg, rng=jax.random.key(0))[
      "cov_selected"
  ]
  np.testing.assert_array_equal(np.asarray(sel) > 0, candidates)  # k = n takes every candidate


@pytest.mark.parametrize("ratio", [0.1, 1.0])
def test_clip_cov_random_control_matches_the_bands_count_from_all_unclipped_tokens(batch, ratio):
  b = batch
  band = make_cfg(name="clip_cov", clip_cov_ratio=ratio, clip_cov_lb=0.2, clip_cov_ub=3.0)
  control = dataclasses.replace(band, clip_cov_tokens="random")
  candidates, _ = _np_clip_cov_candidates(b, band)
  _, l1, l2 = np_clip_terms(b["logp"], b["old"], b["adv"], band, clamp=False)
  unclipped = (b["mask"] > 0) & ~(l2 > l1)
  k = min(max(math.floor(ratio * (b["mask"] > 0).sum()), 1), candidates.sum())
  picks = []
  for seed in range(40):
    sel = losses.select_tokens(
        b["logp"], b["old"], b["adv"], b["mask"], control, rng=jax.random.key(seed)
    )["cov_selected"]
    sel = np.asarray(sel) > 0
    assert sel.sum() == k and not (sel & ~unclipped).any()
    picks.append(sel)
  assert np.mean([(p & ~candidates).any() for p in picks]) > 0.5  # not confined to the band
  assert unclipped.sum() > candidates.sum()


def test_clip_cov_draws_uniform_subsets():
  rng = np.random.default_rng(5)
  t = 20
  mask = np.ones((1, t), np.float32)
  logp = np.log(rng.uniform(0.02, 1, size=(1, t))).astype(np.float32)
  adv = np.where(np.arange(t) % 2, 1.0, -1.0)[None].astype(np.float32)
  cov = np_cov(logp, adv, mask)[0]
  ordered = np.sort(cov)
  lb, ub = (ordered[-6] + ordered[-5]) / 2, (ordered[-1] + ordered[-2]) / 2
  candidates = np.flatnonzero((cov > lb) & (cov < ub))
  assert len(candidates) == 4
  cfg = make_cfg(name="clip_cov", clip_cov_ratio=0.1, clip_cov_lb=float(lb), clip_cov_ub=float(ub))
  keys = jax.random.split(jax.random.key(1), 3000)
  sel = jax.jit(
      jax.vmap(
          lambda key: losses.select_tokens(logp, logp, adv, mask, cfg, rng=key)["cov_selected"][0]
      )
  )(keys)
  sel = np.asarray(sel) > 0
  assert np.all(sel.sum(-1) == 2) and not sel[:, np.setdiff1d(np.arange(t), candidates)].any()
  codes = sel.astype(np.int64) @ (2 ** np.arange(t))
  counts = [np.sum(codes == 2**i + 2**j) for i, j in itertools.combinations(candidates, 2)]
  expected = len(keys) / 6
  assert all(abs(c - expected) < 5 * math.sqrt(expected * 5 / 6) for c in counts), counts


# ----------------------------------------------------------------------------- KL-Cov


def test_kl_cov_penalises_top_covariance_tokens(batch):
  b = batch
  cfg = make_cfg(name="kl_cov", kl_cov_ratio=0.1, kl_cov_coef=0.7)
  loss, metrics, grad = _loss_and_grad(b, cfg)
  valid = b["mask"] > 0
  n = valid.sum()
  k = max(1, math.floor(0.1 * n))
  cov = np_cov(b["logp"], b["adv"], b["mask"])
  top = np_top_mask(cov, valid, k)
  sel = (
      np.asarray(
          losses.select_tokens(b["logp"], b["old"], b["adv"], b["mask"], cfg)["cov_selected"]
      )
      > 0
  )
  np.testing.assert_array_equal(sel, top)
  assert float(metrics["n_cov_selected"]) == k
  ratio, l1, _ = np_clip_terms(b["logp"], b["old"], b["adv"], cfg, clamp=False)
  log_ratio = b["logp"].astype(np.float64) - b["old"]
  l = l1 + 0.7 * top * np.abs(log_ratio)
  np.testing.assert_allclose(loss, np.where(valid, l, 0).sum() / n, rtol=1e-5)
  ref_grad = np.where(valid, -b["adv"] * ratio + 0.7 * top * np.sign(log_ratio), 0) / n
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(metrics["cov_selected_mean"], cov[top].mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["cov_topk_mean"], cov[top].mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["cov_mean"], cov[valid].mean(), rtol=1e-4, atol=1e-7)


def test_kl_cov_on_policy_is_plain_policy_gradient(batch):
  b = dict(batch, old=batch["logp"])
  valid = b["mask"] > 0
  n = valid.sum()
  cfg = make_cfg(name="kl_cov", kl_cov_ratio=0.5)
  loss, metrics, grad = _loss_and_grad(b, cfg)
  assert float(metrics["n_cov_selected"]) == math.floor(0.5 * n)
  np.testing.assert_allclose(loss, -b["adv"][valid].astype(np.float64).sum() / n, rtol=1e-5)
  np.testing.assert_allclose(grad, np.where(valid, -b["adv"], 0) / n, rtol=1e-6, atol=1e-8)


def test_kl_cov_has_no_log_ratio_clamp(batch):
  """verl's kl_cov takes exp(logp - old_logp) unclamped: |log-ratio| > 20 still carries gradient."""
  b = {k: v.copy() for k, v in batch.items()}
  b["adv"][0] = 0.5
  b["old"][0, :2] = b["logp"][0, :2] - np.array([25.0, -30.0], np.float32)
  pad = np.argwhere(b["mask"] == 0)[0]
  b["old"][tuple(pad)] = b["logp"][tuple(pad)] - 500.0  # padding may not overflow into NaN
  cfg = make_cfg(name="kl_cov", kl_cov_ratio=0.1, kl_cov_coef=0.7)
  loss, _, grad = _loss_and_grad(b, cfg)
  valid = b["mask"] > 0
  n = valid.sum()
  top = np_top_mask(np_cov(b["logp"], b["adv"], b["mask"]), valid, max(1, math.floor(0.1 * n)))
  log_ratio = np.where(valid, b["logp"].astype(np.float64) - b["old"], 0.0)
  ratio = np.exp(log_ratio)
  a = b["adv"].astype(np.float64)
  l = -a * ratio + 0.7 * top * np.abs(log_ratio)
  np.testing.assert_allclose(loss, np.where(valid, l, 0).sum() / n, rtol=1e-5)
  ref_grad = np.where(valid, -a * ratio + 0.7 * top * np.sign(log_ratio), 0) / n
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-7)
  assert abs(grad[0, 0]) > 1e8 and np.all(np.isfinite(grad))  # e^25 / n, not 0 as under a clamp


# ----------------------------------------------------------------------------- GSPO, CISPO


def np_agg_weights(m, mode, resp=None):
  """d(aggregated loss) / d(per-token loss l_bt) for `np_aggregate`."""
  m = np.asarray(m, np.float64)
  resp = m if resp is None else resp
  rows = (resp > 0).any(-1).sum()
  if mode == "token-mean":
    return m / m.sum()
  if mode == "seq-mean-token-sum":
    return m / rows
  if mode == "seq-mean-token-mean":
    return m / np.maximum(m.sum(-1, keepdims=True), 1) / rows
  return m / (rows * m.shape[-1])


def np_gspo(logp, old, adv, mask, lo, hi):
  """verl's compute_policy_loss_gspo per token: loss and d loss_bt / d logp_bt (float64)."""
  valid = mask > 0
  log_ratio = np.where(valid, logp.astype(np.float64) - old, 0.0)
  seq = log_ratio.sum(-1) / np.maximum(valid.sum(-1), 1)
  capped = seq > 10.0
  s = np.exp(np.minimum(seq, 10.0))[:, None] * np.ones_like(log_ratio)
  a = adv.astype(np.float64)
  l1, l2 = -a * s, -a * np.clip(s, 1 - lo, 1 + hi)
  dl = np.where((l1 >= l2) & ~capped[:, None], -a * s, 0.0)
  return np.maximum(l1, l2), dl


@pytest.fixture(scope="module")
def gspo_batch(batch):
  b = {k: v.copy() for k, v in batch.items()}
  rng = np.random.default_rng(1)
  shift = rng.normal(size=(b["mask"].shape[0], 1)) * 0.05  # sequence log-ratios around 0
  b["old"] = (b["logp"] - shift + rng.normal(size=b["logp"].shape) * 0.02).astype(np.float32)
  b["old"][3] = b["logp"][3] - 12.0  # mean log-ratio 12 > 10: capped, no gradient
  b["adv"][3] = -1.0  # A < 0: the unclipped branch, so only the cap stops the gradient
  b["old"][b["mask"] == 0] = 7.0
  return b


@pytest.mark.parametrize("mode", losses.AGG_MODES)
@pytest.mark.parametrize("clip", [(0.02, 0.03), (3e-4, 4e-4)])
def test_gspo_matches_verl_in_every_aggregation_mode(gspo_batch, mode, clip):
  b = gspo_batch
  cfg = make_cfg(name="gspo", clip_ratio_low=clip[0], clip_ratio_high=clip[1], loss_agg_mode=mode)
  loss, metrics, grad = _loss_and_grad(b, cfg)
  l, dl = np_gspo(b["logp"], b["old"], b["adv"], b["mask"], *clip)
  num, den = np_aggregate(l, b["mask"], mode)
  np.testing.assert_allclose(loss, num / den, rtol=1e-5)
  np.testing.assert_allclose(grad, dl * np_agg_weights(b["mask"], mode), rtol=1e-5, atol=1e-8)
  valid = b["mask"] > 0
  live = valid & (dl != 0)
  assert live.any() and (valid & (dl == 0)).any() and np.all(grad[3] == 0)
  # The gradient is per token although the ratio is per sequence: rows share s_i, not gradients.
  assert float(metrics["clipfrac_high"]) + float(metrics["clipfrac_low"]) > 0


def test_gspo_ratio_is_the_sequence_geometric_mean(gspo_batch):
  b = gspo_batch
  valid = b["mask"] > 0
  s = np.asarray(losses._gspo_ratio(jnp.asarray(b["logp"]), jnp.asarray(b["old"]), b["mask"]))
  seq = np.where(valid, b["logp"].astype(np.float64) - b["old"], 0).sum(-1) / np.maximum(
      valid.sum(-1), 1
  )
  np.testing.assert_allclose(
      s[valid], np.broadcast_to(np.exp(np.minimum(seq, 10))[:, None], s.shape)[valid], rtol=1e-5
  )


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("clip", [(0.2, 0.28), (1.0, 0.2)])
def test_cispo_matches_verl(batch, mode, clip):
  b = {k: v.copy() for k, v in batch.items()}
  b["old"][0, :3] = b["logp"][0, :3] - np.array([30.0, -30.0, 0.5])  # beyond the +-20 clamp
  cfg = make_cfg(name="cispo", clip_ratio_low=clip[0], clip_ratio_high=clip[1], loss_agg_mode=mode)
  loss, metrics, grad = _loss_and_grad(b, cfg)
  valid = b["mask"] > 0
  ratio = np.exp(np.clip(np.where(valid, b["logp"].astype(np.float64) - b["old"], 0), -20, 20))
  w = np.clip(ratio, 1 - clip[0], 1 + clip[1])
  a = b["adv"].astype(np.float64)
  num, den = np_aggregate(-w * a * b["logp"], b["mask"], mode)
  np.testing.assert_allclose(loss, num / den, rtol=1e-5)
  np.testing.assert_allclose(grad, -w * a * np_agg_weights(b["mask"], mode), rtol=1e-5, atol=1e-8)
  assert np.all(grad[valid & (a != 0)] != 0)  # clipped weights still pass gradient through logp
  np.testing.assert_allclose(
      metrics["clipfrac_high"], (ratio > 1 + clip[1])[valid].mean(), rtol=1e-6
  )


# ----------------------------------------------------------------------------- Archer, advantages


def np_high_entropy(e, mask, q, per_response):
  valid = mask > 0
  if not per_response:
    return valid & (e >= np.quantile(e[valid].astype(np.float64), q))
  high = np.zeros_like(valid)
  for i in np.flatnonzero(valid.any(-1)):
    high[i] = valid[i] & (e[i] >= np.quantile(e[i][valid[i]].astype(np.float64), q))
  return high


@pytest.mark.parametrize("scope", ["response", "selection"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum"])
def test_archer_dual_token_constraints(batch, scope, mode):
  b = {k: v.copy() for k, v in batch.items()}
  rng = np.random.default_rng(2)
  b["old"] = (b["logp"] + rng.normal(size=b["logp"].shape) * 0.4).astype(np.float32)
  ref = (b["logp"] + rng.normal(size=b["logp"].shape) * 0.3).astype(np.float32)
  cfg = make_cfg(
      name="archer",
      kl_ref_coef=0.3,
      entropy_quantile_scope=scope,
      loss_agg_mode=mode,
      clip_ratio_low=0.1,
      clip_ratio_high=0.1,
      archer_high_clip_ratio_low=0.4,
      archer_high_clip_ratio_high=0.5,
  )
  loss, metrics, grad = _loss_and_grad(b, cfg, entropy_BxT=b["entropy"], ref_logp_BxT=ref)
  valid = b["mask"] > 0
  high = np_high_entropy(b["entropy"], b["mask"], 0.8, scope == "response")
  sel = losses.select_tokens(
      b["logp"], b["old"], b["adv"], b["mask"], cfg, entropy_BxT=b["entropy"]
  )["high_entropy"]
  np.testing.assert_array_equal(np.asarray(sel) > 0, high)
  lp, a = b["logp"].astype(np.float64), b["adv"].astype(np.float64)
  raw = lp - b["old"]
  ratio = np.exp(np.clip(raw, -20, 20))
  lo, hi = np.where(high, 0.4, 0.1), np.where(high, 0.5, 0.1)
  l1, l2 = -a * ratio, -a * np.clip(ratio, 1 - lo, 1 + hi)
  clipped = np.maximum(l1, l2)
  dual = (a < 0) & (clipped > -3 * a)
  l = np.where(dual, -3 * a, clipped)
  d = lp - ref
  l = l + 0.3 * ~high * (np.exp(-d) + d - 1)
  num, den = np_aggregate(l, b["mask"], mode)
  np.testing.assert_allclose(loss, num / den, rtol=1e-5)
  pg_dl = np.where((l1 >= l2) & ~dual, -a * ratio, 0)
  dl = pg_dl + 0.3 * ~high * (1 - np.exp(-d))
  np.testing.assert_allclose(grad, dl * np_agg_weights(b["mask"], mode), rtol=1e-5, atol=1e-8)
  # Ratios between the two clip ranges: clipped on low-entropy tokens only.
  between = valid & (-a * np.clip(ratio, 0.9, 1.1) > l1) & (np.abs(ratio - 1) < 0.4) & ~dual
  assert (between & high & (pg_dl != 0)).any() and (between & ~high & (pg_dl == 0)).any()
  assert float(metrics["n_high_entropy"]) == high.sum()
  kl_low = (np.exp(-d) + d - 1)[valid & ~high]
  np.testing.assert_allclose(metrics["kl_ref"], kl_low.mean(), rtol=1e-5)


@pytest.mark.parametrize("scope", ["response", "selection"])
def test_top_quantile_token_mask_scope(batch, scope):
  b = batch
  cfg = make_cfg(token_mask="top_quantile", token_mask_rho=0.3, entropy_quantile_scope=scope)
  keep = losses.select_tokens(
      b["logp"], b["old"], b["adv"], b["mask"], cfg, entropy_BxT=b["entropy"]
  )["token_mask"]
  np.testing.assert_array_equal(
      np.asarray(keep) > 0, np_high_entropy(b["entropy"], b["mask"], 0.7, scope == "response")
  )


@pytest.mark.parametrize(
    "alpha,kappa,lam", [(0.4, 2.0, 1.0), (5.0, 2.0, 1.0), (0.0, 2.0, 0.1), (0.4, 2.0, 0.1)]
)
def test_entropy_shaped_and_positive_weighted_advantages(batch, alpha, kappa, lam):
  b = batch
  cfg = make_cfg(entropy_adv_alpha=alpha, entropy_adv_kappa=kappa, positive_adv_weight=lam)

  def f(logp, entropy):
    return losses.policy_loss(logp, b["old"], b["adv"], b["mask"], cfg, entropy_BxT=entropy)[0]

  loss, (grad, grad_entropy) = jax.value_and_grad(f, argnums=(0, 1))(
      jnp.asarray(b["logp"]), jnp.asarray(b["entropy"])
  )
  valid = b["mask"] > 0
  a = b["adv"].astype(np.float64)
  shaped = a + np.minimum(alpha * b["entropy"], np.abs(a) / kappa)
  shaped = np.where(shaped > 0, lam * shaped, shaped)
  np.testing.assert_allclose(
      losses.effective_advantages(b["adv"], b["entropy"], b["mask"], cfg)[valid],
      shaped[valid],
      rtol=1e-5,
  )
  l = np_ppo(b["logp"], b["old"], shaped, cfg)
  n = valid.sum()
  np.testing.assert_allclose(float(loss), np.where(valid, l, 0).sum() / n, rtol=1e-5)
  ratio, l1, l2 = np_clip_terms(b["logp"], b["old"], shaped, cfg, clamp=True)
  dual = (shaped < 0) & (np.maximum(l1, l2) > -shaped * cfg.clip_ratio_c)
  live = valid & (l1 >= l2) & ~dual
  np.testing.assert_allclose(grad, np.where(live, -shaped * ratio, 0) / n, rtol=1e-5, atol=1e-7)
  assert np.all(np.asarray(grad_entropy) == 0)  # sg(H): no gradient through the shaping
  if alpha > 0:  # the shaping never flips a sign for kappa > 1
    assert np.all(np.sign(shaped[valid & (a != 0)]) == np.sign(a[valid & (a != 0)]))
    assert np.any(shaped[valid] != a[valid])


def test_adaptive_entropy_controller():
  cfg = make_cfg(
      adaptive_entropy=True,
      entropy_coef=0.01,
      entropy_target=1.0,
      entropy_coef_delta=0.004,
      entropy_coef_min=0.002,
      entropy_coef_max=0.02,
  )
  entropies = [1.5, 1.2, 0.9, 0.5, 0.7, 1.0, 2.0, 3.0, 0.1, 0.1, 0.1, 0.1]
  coef, last = 0.01, math.inf
  jc, jl = jnp.float32(0.01), jnp.float32(jnp.inf)
  for h in entropies:
    applied = coef if last <= 1.0 else 0.0
    np.testing.assert_allclose(losses.applied_entropy_coef(jc, jl, cfg), applied, rtol=1e-6)
    coef = min(coef + 0.004, 0.02) if h <= 1.0 else max(coef - 0.004, 0.002)
    jc, jl = losses.adaptive_entropy_coef(jc, jnp.float32(h), cfg), jnp.float32(h)
    last = h
    np.testing.assert_allclose(jc, coef, rtol=1e-6)
  assert float(jc) == np.float32(0.02)  # held at the maximum


@pytest.mark.parametrize(
    "name,extra",
    [
        ("gspo", {}),
        ("cispo", {}),
        ("archer", {"entropy_quantile_scope": "response"}),
        ("archer", {"entropy_quantile_scope": "selection"}),
    ],
)
def test_new_losses_accumulate_over_microbatches(batch, name, extra):
  b = batch
  args = [jnp.asarray(b[k]) for k in ("logp", "old", "adv", "mask")]
  micro, rows = 4, b["mask"].shape[0] // 4
  for mode in losses.AGG_MODES:
    cfg = make_cfg(name=name, loss_agg_mode=mode, selection_scope="global", **extra)
    full, _ = losses.policy_loss(*args, cfg, entropy_BxT=b["entropy"])
    sel = losses.select_tokens(*args, cfg, entropy_BxT=b["entropy"])
    den = losses.global_denominator(b["mask"], cfg, micro)
    total = sum(
        float(
            losses.policy_loss(
                *[x[i * rows : (i + 1) * rows] for x in args],
                cfg,
                entropy_BxT=b["entropy"][i * rows : (i + 1) * rows],
                selections={k: v[i * rows : (i + 1) * rows] for k, v in sel.items()},
                denominator=den,
            )[0]
        )
        for i in range(micro)
    )
    np.testing.assert_allclose(total, float(full), rtol=1e-5, atol=1e-7, err_msg=mode)


# ----------------------------------------------------------------------------- entropy masks


@pytest.mark.parametrize("token_mask", ["top_entropy", "bottom_entropy", "random", "top_quantile"])
def test_entropy_token_mask_loss(batch, token_mask):
  b = batch
  cfg = make_cfg(token_mask=token_mask, token_mask_rho=0.3)
  loss, metrics, grad = _loss_and_grad(b, cfg, entropy_BxT=b["entropy"], rng=jax.random.key(2))
  keep = (
      np.asarray(
          losses.select_tokens(
              b["logp"],
              b["old"],
              b["adv"],
              b["mask"],
              cfg,
              entropy_BxT=b["entropy"],
              rng=jax.random.key(2),
          )["token_mask"]
      )
      > 0
  )
  valid = b["mask"] > 0
  n = valid.sum()
  e = b["entropy"]
  if token_mask == "top_quantile":
    np.testing.assert_array_equal(keep, valid & (e >= np.quantile(e[valid].astype(float), 0.7)))
    den = n  # TRL: averaged over all valid tokens
  else:
    top = np_top_mask(e, valid, math.ceil(0.3 * n))
    expected = {"top_entropy": top, "bottom_entropy": valid & ~top}.get(token_mask)
    if expected is not None:
      np.testing.assert_array_equal(keep, expected)
    else:
      assert keep.sum() == math.ceil(0.3 * n) and not (keep & ~valid).any()
    den = keep.sum()  # averaged over the kept tokens only
  l = np_ppo(b["logp"], b["old"], b["adv"], cfg)
  np.testing.assert_allclose(loss, np.where(keep, l, 0).sum() / den, rtol=1e-5)
  assert float(metrics["loss_den"]) == den and float(metrics["n_token_mask"]) == keep.sum()
  assert np.all(grad[~keep] == 0) and np.any(grad[keep] != 0)
  np.testing.assert_allclose(metrics["entropy_token_mask_mean"], e[keep].mean(), rtol=1e-5)


# ----------------------------------------------------------------------------- aggregation


@pytest.mark.parametrize("mode", losses.AGG_MODES)
def test_aggregate_loss_matches_numpy(batch, mode):
  b = batch
  token_mask = b["mask"] * (b["entropy"] > 0.5)
  num, den = losses.aggregate_loss(b["logp"], token_mask, mode, response_mask_BxT=b["mask"])
  ref_num, ref_den = np_aggregate(b["logp"], token_mask, mode, resp=b["mask"])
  np.testing.assert_allclose(num, ref_num, rtol=1e-5)
  assert float(den) == ref_den
  num, den = losses.aggregate_loss(b["logp"], b["mask"], mode, max_len=50)
  ref_num, ref_den = np_aggregate(b["logp"], b["mask"], mode)
  assert float(den) == (ref_den / b["mask"].shape[1] * 50 if mode.endswith("norm") else ref_den)


@pytest.mark.parametrize("mode", losses.AGG_MODES)
@pytest.mark.parametrize("token_mask", list(losses.TOKEN_MASKS))
def test_accumulation_over_microbatches_equals_full_batch(batch, mode, token_mask):
  b = batch
  args = [jnp.asarray(b[k]) for k in ("logp", "old", "adv", "mask")]
  key = jax.random.key(4)
  micro = 4
  rows = b["mask"].shape[0] // micro

  def split(x, i):
    return x[i * rows : (i + 1) * rows]

  def run(cfg, args, **kw):
    return losses.policy_loss(*args, cfg, **kw)

  # Global scope: selections over the whole batch, sliced; global denominator.
  cfg = make_cfg(
      name="clip_cov",
      clip_cov_ratio=0.1,
      clip_cov_lb=0.2,
      clip_cov_ub=3.0,
      loss_agg_mode=mode,
      token_mask=token_mask,
      token_mask_rho=0.3,
      selection_scope="global",
  )
  full_loss, full_metrics = run(cfg, args, entropy_BxT=b["entropy"], rng=key)
  sel = losses.select_tokens(*args, cfg, entropy_BxT=b["entropy"], rng=key)
  den = losses.global_denominator(b["mask"], cfg, micro)
  assert float(den) == float(full_metrics["loss_den"])
  total = sum(
      float(
          run(
              cfg,
              [split(x, i) for x in args],
              entropy_BxT=split(b["entropy"], i),
              selections={k: split(v, i) for k, v in sel.items()},
              denominator=den,
          )[0]
      )
      for i in range(micro)
  )
  np.testing.assert_allclose(total, float(full_loss), rtol=1e-5, atol=1e-7)

  # Micro-batch scope: the global denominator is the sum of the local ones.
  cfg = make_cfg(loss_agg_mode=mode, token_mask=token_mask, token_mask_rho=0.3)
  outs = [
      run(
          cfg,
          [split(x, i) for x in args],
          entropy_BxT=split(b["entropy"], i),
          rng=jax.random.fold_in(key, i),
      )[1]
      for i in range(micro)
  ]
  den = losses.global_denominator(b["mask"], cfg, micro)
  assert float(den) == sum(float(m["loss_den"]) for m in outs)
  if token_mask == "all":
    num = sum(float(m["loss_num"]) for m in outs)
    np.testing.assert_allclose(num / float(den), float(run(cfg, args)[0]), rtol=1e-5, atol=1e-7)


def test_accumulated_gradient_equals_full_batch(batch):
  b = batch
  cfg = make_cfg(loss_agg_mode="seq-mean-token-mean")
  args = [jnp.asarray(b[k]) for k in ("old", "adv", "mask")]
  den = losses.global_denominator(b["mask"], cfg, 4)

  def loss(logp, old, adv, mask, denominator=None):
    return losses.policy_loss(logp, old, adv, mask, cfg, denominator=denominator)[0]

  full = jax.grad(loss)(jnp.asarray(b["logp"]), *args)
  parts = [
      jax.grad(loss)(
          jnp.asarray(b["logp"][i * 2 : (i + 1) * 2]),
          *[x[i * 2 : (i + 1) * 2] for x in args],
          denominator=den,
      )
      for i in range(4)
  ]
  np.testing.assert_allclose(np.concatenate(parts), full, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------- KL, entropy bonus


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_penalty(batch, estimator):
  d = batch["logp"].astype(np.float64) - batch["old"]
  expected = {"k1": d, "k2": 0.5 * d**2, "k3": np.exp(-d) + d - 1}[estimator]
  np.testing.assert_allclose(
      losses.kl_penalty(batch["logp"], batch["old"], estimator), expected, rtol=1e-5, atol=1e-6
  )


def test_entropy_bonus_is_not_double_counted(batch):
  b = batch
  np.testing.assert_allclose(losses.entropy_bonus(b["entropy"], 0.5), -0.5 * b["entropy"])
  base, _, _ = _loss_and_grad(b, make_cfg())
  with_coefs, _, _ = _loss_and_grad(
      b, make_cfg(entropy_coef=0.01, kl_ref_coef=0.1), entropy_BxT=b["entropy"]
  )
  assert with_coefs == base  # the caller adds these terms


# ----------------------------------------------------------------------------- jit, sharding


def test_sharded_mesh_equals_single_device(batch):
  b = batch
  cfg = make_cfg(
      name="clip_cov",
      clip_cov_ratio=0.1,
      clip_cov_lb=0.2,
      clip_cov_ub=3.0,
      token_mask="top_entropy",
      token_mask_rho=0.5,
  )
  key = jax.random.key(7)

  @jax.jit
  def f(logp, old, adv, mask, entropy):
    def loss(lp):
      return losses.policy_loss(lp, old, adv, mask, cfg, entropy_BxT=entropy, rng=key)

    return jax.value_and_grad(loss, has_aux=True)(logp)

  names = ("logp", "old", "adv", "mask", "entropy")
  (loss, metrics), grad = f(*[jnp.asarray(b[k]) for k in names])
  mesh = Mesh(
      np.array(jax.devices()[:8]).reshape(2, 2, 2),
      ("data", "fsdp", "tensor"),
      axis_types=(AxisType.Auto,) * 3,
  )
  sharding = NamedSharding(mesh, P(("data", "fsdp"), "tensor"))
  sharded = [jax.device_put(b[k], sharding) for k in names]
  (s_loss, s_metrics), s_grad = f(*sharded)
  assert len(s_grad.sharding.device_set) == 8
  assert float(metrics["n_cov_selected"]) > 0
  np.testing.assert_allclose(float(s_loss), float(loss), rtol=1e-6)
  np.testing.assert_allclose(s_grad, grad, rtol=1e-6, atol=1e-9)
  for k in metrics:
    np.testing.assert_allclose(s_metrics[k], metrics[k], rtol=1e-5, atol=1e-7, err_msg=k)


@pytest.mark.parametrize(
    "extra",
    [
        dict(name="clip_cov", clip_cov_ratio=0.2, clip_cov_lb=-5.0),
        dict(name="kl_cov", kl_cov_ratio=0.2),
        dict(token_mask="top_entropy", token_mask_rho=0.3),
        dict(name="archer"),
    ],
)
def test_device_scope_selects_within_each_devices_rows(batch, extra):
  """verl's scope: each device's contiguous block of rows is its own selection set."""
  b = {k: jnp.asarray(v) for k, v in batch.items()}
  rng = jax.random.key(3)
  args = (b["logp"], b["old"], b["adv"], b["mask"])
  kw = dict(entropy_BxT=b["entropy"])
  dev = losses.select_tokens(
      *args, make_cfg(selection_scope="device", selection_shards=2, **extra), rng=rng, **kw
  )
  micro = make_cfg(**extra)
  halves = [
      losses.select_tokens(
          *(x[4 * d : 4 * d + 4] for x in args),
          micro,
          entropy_BxT=b["entropy"][4 * d : 4 * d + 4],
          rng=jax.random.fold_in(rng, d),
      )
      for d in range(2)
  ]
  for k in losses.SELECTION_KEYS:
    np.testing.assert_array_equal(dev[k], np.concatenate([h[k] for h in halves]))
  one = losses.select_tokens(
      *args, make_cfg(selection_scope="device", selection_shards=1, **extra), rng=rng, **kw
  )
  whole = losses.select_tokens(*args, micro, rng=rng, **kw)
  for k in losses.SELECTION_KEYS:
    np.testing.assert_array_equal(one[k], whole[k])
  if extra.get("name") == "kl_cov":  # per-device counts: floor(0.2 n_d) each, not floor(0.2 n)
    n = [int(batch["mask"][4 * d : 4 * d + 4].sum()) for d in range(2)]
    assert float(dev["cov_selected"].sum()) == sum(max(1, int(0.2 * x)) for x in n)


def test_device_scope_rows_must_split(batch):
  b = {k: jnp.asarray(v) for k, v in batch.items()}
  cfg = make_cfg(name="kl_cov", selection_scope="device", selection_shards=3)
  with pytest.raises(ValueError, match="3 devices"):
    losses.select_tokens(b["logp"], b["old"], b["adv"], b["mask"], cfg)


def test_cov_mass_selected_is_the_selected_share_of_positive_covariance(batch):
  b = {k: jnp.asarray(v) for k, v in batch.items()}
  cfg = make_cfg(name="kl_cov", kl_cov_ratio=0.1)
  _, metrics = losses.policy_loss(b["logp"], b["old"], b["adv"], b["mask"], cfg)
  sel = losses.select_tokens(b["logp"], b["old"], b["adv"], b["mask"], cfg)["cov_selected"]
  cov = np_cov(batch["logp"], batch["adv"], batch["mask"])
  pos = np.where(batch["mask"] > 0, np.maximum(cov, 0.0), 0.0)
  expected = (pos * np.asarray(sel)).sum() / pos.sum()
  np.testing.assert_allclose(float(metrics["cov_mass_selected"]), expected, rtol=1e-5)
  assert 0.0 < expected < 1.0
