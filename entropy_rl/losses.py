"""Policy losses around the entropy mechanism (EM arXiv 2505.22617, HE arXiv 2506.01939).

- `ppo`: clipped surrogate with clip-higher (`clip_ratio_low`/`clip_ratio_high`) and dual-clip
  (`clip_ratio_c`) for negative advantages, ratio = exp(clip(logp - old_logp, -20, 20)).
- `clip_cov` (EM Eq. 11-12): a random `max(floor(r * n), 1)` of the not-yet-clipped tokens with
  `lb < cov < ub` get loss x 0 (they stay in the denominator); others the PPO surrogate without
  dual-clip and without the log-ratio clamp. `clip_cov_tokens='random'` is its entropy control: as
  many tokens as the band would give, drawn uniformly from all not-yet-clipped tokens.
- `kl_cov` (EM Eq. 13-14): `-A * ratio` for every token plus `beta * |logp - old_logp|` on the
  `max(1, floor(kappa * n))` tokens with the largest covariance; ratio = exp(logp - old_logp) without
  a clamp, as in verl's `kl_cov` (a log-ratio above ~88.7 overflows float32 to inf there and here;
  the update skips non-finite steps). Padding tokens always get log-ratio 0, so they cannot overflow.
- `gspo` (arXiv 2507.18071): sequence ratio `s_i = exp(mean_t (logp - old_logp))` over the response
  mask, applied per token as `s_it = sg(s_i) * pi / sg(pi)` with log s_it clamped at 10 from above;
  `l = max(-A s_it, -A clip(s_it, 1 - eps_low, 1 + eps_high))` (paper: eps 3e-4 / 4e-4). The
  per-token loss equals verl's `gspo`; verl always aggregates it seq-mean-token-mean (the config
  family's mode), here `loss_agg_mode` is honoured.
- `cispo` (arXiv 2506.13585): `l = -sg(clip(ratio, 1 - eps_low, 1 + eps_high)) * A * logp`, ratio
  from the log-ratio clamped at +-20 (as verl's `cispo`).
- `archer` (dual-token constraints, arXiv 2507.15778): tokens with entropy >= the
  `archer_entropy_quantile` quantile (per response by default in the config family) get the wide
  clip (`archer_high_clip_ratio_low/high`) and no KL; the others the PPO clip
  (`clip_ratio_low/high`) plus `kl_ref_coef * KL(pi || ref)`; dual-clip as in `ppo`.
- Advantage modifiers for every loss: entropy shaping (arXiv 2506.14758)
  `A' = A + min(alpha * sg(H), |A| / kappa)`, then W-REINFORCE's (arXiv 2506.01347) weight
  `lambda` on positive advantages: `A'' = lambda * A'` where `A' > 0`.
- Adaptive entropy coefficient (Skywork-OR1, arXiv 2505.22312; TRL's `use_adaptive_entropy`):
  `adaptive_entropy_coef` / `applied_entropy_coef`; the coefficient lives in `step.TrainState`.
- Entropy token masks (HE Eq. 6), four aggregation modes returning (numerator, denominator),
  KL-to-reference estimators and an entropy bonus.

Selections (entropy token masks, Clip-Cov / KL-Cov tokens, Archer's split) happen over a selection
set, `selection_scope`: each micro-batch ('microbatch'); each data-parallel device's rows of it
('device', as verl selects on each rank's micro-batch: `select_tokens` splits the rows into
`cfg.selection_shards` contiguous blocks, one per device); or the whole update batch ('global': the
trainer selects once and passes `selections` slices in).
Every `cfg` is a `config_lib.LossConfig` (valid by construction; its defaults are GRPO's).
"""

import jax
import jax.numpy as jnp

from entropy_rl import stats

LOSS_NAMES = ("ppo", "clip_cov", "kl_cov", "gspo", "cispo", "archer")
AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# config.loss.token_mask -> stats.entropy_token_mask mode.
TOKEN_MASKS = {
    "all": None,
    "top_entropy": "top",
    "bottom_entropy": "bottom",
    "random": "random",
    "top_quantile": "top_quantile",
}
SELECTION_SCOPES = ("microbatch", "device", "global")
# Where an entropy quantile (token_mask 'top_quantile', archer's split) is taken: over each response,
# or over the selection set (the micro-batch, or the whole update batch for selection_scope='global').
ENTROPY_QUANTILE_SCOPES = ("selection", "response")
KL_ESTIMATORS = ("k1", "k2", "k3")
CLIP_COV_TOKENS = ("band", "random")
LOG_RATIO_CLAMP = 20.0
GSPO_LOG_RATIO_CAP = 10.0
SELECTION_KEYS = ("token_mask", "cov_selected", "high_entropy")


def _check_inputs(cfg, logp_BxT, old_logp_BxT, adv_BxT, mask_BxT, entropy_BxT):
  if logp_BxT.ndim != 2:
    raise ValueError(f"logp_BxT must be [batch, time]; got shape {tuple(logp_BxT.shape)}")
  stats.check_same_shape(
      "logp_BxT",
      logp_BxT,
      old_logp_BxT=old_logp_BxT,
      adv_BxT=adv_BxT,
      mask_BxT=mask_BxT,
      entropy_BxT=entropy_BxT,
  )
  if entropy_BxT is None and cfg.entropy_adv_alpha > 0:
    raise ValueError("entropy_BxT is required when config.loss.entropy_adv_alpha > 0")


def _check_selection_args(cfg, entropy_BxT, rng):
  if rng is None and (cfg.name == "clip_cov" or cfg.token_mask == "random"):
    raise ValueError(
        "rng is required when config.loss.name is 'clip_cov' or "
        "config.loss.token_mask is 'random'"
    )
  if entropy_BxT is None and cfg.token_mask in ("top_entropy", "bottom_entropy", "top_quantile"):
    raise ValueError(f"entropy_BxT is required for config.loss.token_mask={cfg.token_mask!r}")
  if entropy_BxT is None and cfg.name == "archer":
    raise ValueError("entropy_BxT is required for config.loss.name='archer'")


def effective_advantages(adv_BxT, entropy_BxT, mask_BxT, cfg):
  """The advantage every loss uses: entropy shaping, then positive-sample down-weighting.

  Entropy-shaped advantage (arXiv 2506.14758): `A' = A + min(alpha * sg(H), |A| / kappa)`
  (`entropy_adv_alpha`, `entropy_adv_kappa`; alpha = 0 leaves A unchanged). W-REINFORCE (arXiv
  2506.01347): `A'' = lambda * A'` where `A' > 0` (`positive_adv_weight`; lambda = 1 leaves it).
  Masked tokens keep their (never counted) value.
  """
  adv_BxT = adv_BxT.astype(jnp.float32)
  valid_BxT = mask_BxT > 0
  if cfg.entropy_adv_alpha > 0:
    entropy_BxT = jax.lax.stop_gradient(entropy_BxT).astype(jnp.float32)
    shaping_BxT = jnp.minimum(
        cfg.entropy_adv_alpha * entropy_BxT, jnp.abs(adv_BxT) / cfg.entropy_adv_kappa
    )
    adv_BxT = jnp.where(valid_BxT, adv_BxT + shaping_BxT, adv_BxT)
  if cfg.positive_adv_weight != 1.0:
    adv_BxT = jnp.where(valid_BxT & (adv_BxT > 0), cfg.positive_adv_weight * adv_BxT, adv_BxT)
  return adv_BxT


def _log_ratio(logp_BxT, old_logp_BxT, mask_BxT):
  """logp - old_logp on valid tokens, 0 on padding (padding never overflows an exp)."""
  return jnp.where(mask_BxT > 0, logp_BxT - old_logp_BxT, 0.0)


def _clip_terms(logp_BxT, old_logp_BxT, adv_BxT, mask_BxT, clip_low, clip_high, clamp_log_ratio):
  log_ratio_BxT = _log_ratio(logp_BxT, old_logp_BxT, mask_BxT)
  if clamp_log_ratio:
    log_ratio_BxT = jnp.clip(log_ratio_BxT, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
  ratio_BxT = jnp.exp(log_ratio_BxT)
  l1_BxT = -adv_BxT * ratio_BxT
  l2_BxT = -adv_BxT * jnp.clip(ratio_BxT, 1.0 - clip_low, 1.0 + clip_high)
  return ratio_BxT, l1_BxT, l2_BxT


def _gspo_ratio(logp_BxT, old_logp_BxT, mask_BxT):
  """GSPO's token ratio `s_it = sg(s_i) * pi / sg(pi)`, log s_it clamped at 10 from above.

  `log s_i = sum_t m (logp - old_logp) / max(sum_t m, 1)`. The clamp passes the gradient up to and
  at the cap and none beyond it (torch.clamp's), so values and gradients equal verl's `gspo`.
  """
  valid_BxT = mask_BxT > 0
  log_ratio_BxT = _log_ratio(logp_BxT, old_logp_BxT, mask_BxT)
  seq_log_ratio_B = jnp.sum(log_ratio_BxT, axis=-1) / jnp.maximum(
      jnp.sum(valid_BxT, axis=-1), 1
  ).astype(jnp.float32)
  sg = jax.lax.stop_gradient
  logp_BxT = jnp.where(valid_BxT, logp_BxT, 0.0)
  log_s_BxT = logp_BxT - sg(logp_BxT) + sg(seq_log_ratio_B)[:, None]
  log_s_BxT = jnp.where(log_s_BxT > GSPO_LOG_RATIO_CAP, GSPO_LOG_RATIO_CAP, log_s_BxT)
  return jnp.exp(log_s_BxT)


def entropy_quantile_mask(entropy_BxT, mask_BxT, q, scope):
  """Valid tokens with entropy >= the linear-interpolation `q` quantile of valid entropies.

  `scope='response'`: one quantile per row (Archer's per-response threshold); 'selection': one over
  the whole given array. Entropy taken stop-gradient.
  """
  entropy_BxT = jax.lax.stop_gradient(entropy_BxT).astype(jnp.float32)
  valid_BxT = mask_BxT > 0
  if scope == "response":
    threshold = jax.vmap(lambda e_T, v_T: stats.masked_quantile(e_T, v_T, q))(
        entropy_BxT, valid_BxT
    )[:, None]
  else:
    threshold = stats.masked_quantile(entropy_BxT, valid_BxT, q)
  return valid_BxT & (entropy_BxT >= threshold)


def adaptive_entropy_coef(coef, entropy, cfg):
  """Skywork-OR1 / TRL controller, once per optimizer step from the measured token-mean entropy H:
  `c' = min(c + delta, c_max)` if `H <= target`, else `max(c - delta, c_min)`."""
  return jnp.where(
      entropy <= cfg.entropy_target,
      jnp.minimum(coef + cfg.entropy_coef_delta, cfg.entropy_coef_max),
      jnp.maximum(coef - cfg.entropy_coef_delta, cfg.entropy_coef_min),
  )


def applied_entropy_coef(coef, last_entropy, cfg):
  """The bonus coefficient of this optimizer step: `c * 1[H_last <= target]`, H_last the entropy
  measured at the previous optimizer step (inf before the first: no bonus, as in TRL)."""
  return jnp.where(last_entropy <= cfg.entropy_target, coef, 0.0)


def select_tokens(logp_BxT, old_logp_BxT, adv_BxT, mask_BxT, cfg, *, entropy_BxT=None, rng=None):
  """Float32 [B, T] masks over the given arrays, computed stop-gradient.

  `token_mask`: the entropy token mask (`mask` itself when token_mask='all').
  `cov_selected`: Clip-Cov's zeroed tokens, KL-Cov's penalised tokens (zeros for other losses).
  `high_entropy`: Archer's high-entropy tokens (zeros for other losses).
  Covariances use the effective advantages (`effective_advantages`). The arrays are one selection
  set, or with selection_scope='device' `cfg.selection_shards` of them (contiguous row blocks, the
  d-th drawing its random scores from `fold_in(rng, d)`).
  """
  _check_inputs(cfg, logp_BxT, old_logp_BxT, adv_BxT, mask_BxT, entropy_BxT)
  _check_selection_args(cfg, entropy_BxT, rng)
  shards = cfg.selection_shards if cfg.selection_scope == "device" else 1
  if shards == 1:
    return _select_tokens(logp_BxT, old_logp_BxT, adv_BxT, mask_BxT, cfg, entropy_BxT, rng)
  if logp_BxT.shape[0] % shards:
    raise ValueError(
        f"selection_scope='device': {logp_BxT.shape[0]} rows do not split over "
        f"{shards} devices (config.rl.num_microbatches too large for the mesh?)"
    )
  split = lambda x: None if x is None else x.reshape(shards, -1, *x.shape[1:])
  keys = None if rng is None else jax.vmap(lambda d: jax.random.fold_in(rng, d))(jnp.arange(shards))
  out = jax.vmap(
      lambda lp, old, a, m, h, k: _select_tokens(lp, old, a, m, cfg, h, k),
      in_axes=(0, 0, 0, 0, None if entropy_BxT is None else 0, None if rng is None else 0),
  )(*map(split, (logp_BxT, old_logp_BxT, adv_BxT, mask_BxT, entropy_BxT)), keys)
  return {k: v.reshape(logp_BxT.shape) for k, v in out.items()}


def _select_tokens(logp_BxT, old_logp_BxT, adv_BxT, mask_BxT, cfg, entropy_BxT, rng):
  """`select_tokens` over one selection set."""
  adv_BxT = effective_advantages(adv_BxT, entropy_BxT, mask_BxT, cfg)
  logp_BxT, old_logp_BxT, adv_BxT = jax.lax.stop_gradient(
      (logp_BxT.astype(jnp.float32), old_logp_BxT.astype(jnp.float32), adv_BxT.astype(jnp.float32))
  )
  valid_BxT = mask_BxT > 0
  n = jnp.sum(valid_BxT, dtype=jnp.int32)

  mode = TOKEN_MASKS[cfg.token_mask]
  if mode is None:
    token_mask_BxT = valid_BxT.astype(jnp.float32)
  elif mode == "top_quantile" and cfg.entropy_quantile_scope == "response":
    token_mask_BxT = entropy_quantile_mask(
        entropy_BxT, mask_BxT, 1.0 - cfg.token_mask_rho, "response"
    ).astype(jnp.float32)
  else:
    scores_BxT = jnp.zeros_like(logp_BxT) if entropy_BxT is None else entropy_BxT
    token_mask_BxT = stats.entropy_token_mask(
        scores_BxT,
        mask_BxT,
        cfg.token_mask_rho,
        mode,
        None if rng is None else jax.random.fold_in(rng, 1),
    )

  cov_BxT = stats.token_covariance(logp_BxT, adv_BxT, mask_BxT)
  if cfg.name == "clip_cov":
    _, l1_BxT, l2_BxT = _clip_terms(
        logp_BxT,
        old_logp_BxT,
        adv_BxT,
        mask_BxT,
        cfg.clip_ratio_low,
        cfg.clip_ratio_high,
        clamp_log_ratio=False,
    )
    candidates_BxT = (
        valid_BxT & ~(l2_BxT > l1_BxT) & (cov_BxT > cfg.clip_cov_lb) & (cov_BxT < cfg.clip_cov_ub)
    )
    k = stats.top_count(cfg.clip_cov_ratio, n)
    if cfg.clip_cov_tokens == "random":  # the band's count, from every unclipped token
      k = jnp.minimum(k, jnp.sum(candidates_BxT, dtype=jnp.int32))
      candidates_BxT = valid_BxT & ~(l2_BxT > l1_BxT)
    scores_BxT = jax.random.uniform(jax.random.fold_in(rng, 0), valid_BxT.shape)
    selected_BxT = stats.top_k_mask(scores_BxT, candidates_BxT, k)
  elif cfg.name == "kl_cov":
    selected_BxT = stats.top_k_mask(cov_BxT, valid_BxT, stats.top_count(cfg.kl_cov_ratio, n))
  else:
    selected_BxT = jnp.zeros(valid_BxT.shape, bool)
  if cfg.name == "archer":
    high_BxT = entropy_quantile_mask(
        entropy_BxT, mask_BxT, cfg.archer_entropy_quantile, cfg.entropy_quantile_scope
    )
  else:
    high_BxT = jnp.zeros(valid_BxT.shape, bool)
  return {
      "token_mask": token_mask_BxT,
      "cov_selected": selected_BxT.astype(jnp.float32),
      "high_entropy": high_BxT.astype(jnp.float32),
  }


def aggregate_loss(loss_BxT, mask_BxT, mode, max_len=None, *, response_mask_BxT=None):
  """(numerator, denominator) of the aggregated loss; numerator / denominator is the loss.

  `token-mean` sum(l m) / sum(m); `seq-mean-token-sum` sum(l m) / S; `seq-mean-token-mean`
  sum_b [sum_t l m / sum_t m] / S; `seq-mean-token-sum-norm` (Dr.GRPO) sum(l m) / (S * max_len),
  with S the rows holding >= 1 token of `response_mask_BxT` (default `mask_BxT`) and max_len
  defaulting to T. Sums over row splits of both parts give the full batch's parts.
  """
  if mode not in AGG_MODES:
    raise ValueError(f"mode must be one of {AGG_MODES}; got {mode!r}")
  stats.check_same_shape(
      "loss_BxT", loss_BxT, mask_BxT=mask_BxT, response_mask_BxT=response_mask_BxT
  )
  m_BxT = mask_BxT.astype(jnp.float32)
  response_BxT = mask_BxT if response_mask_BxT is None else response_mask_BxT
  lm_BxT = jnp.where(m_BxT != 0, loss_BxT.astype(jnp.float32), 0.0) * m_BxT
  num_seqs = jnp.sum(jnp.any(response_BxT > 0, axis=-1), dtype=jnp.float32)
  max_len = loss_BxT.shape[-1] if max_len is None else max_len
  den = loss_denominator(mode, jnp.sum(m_BxT), num_seqs, max_len)
  if mode == "seq-mean-token-mean":
    return jnp.sum(stats.masked_mean(loss_BxT, m_BxT, axis=-1)), den
  return jnp.sum(lm_BxT), den


def loss_denominator(mode, num_tokens, num_seqs, max_len):
  """The denominator of aggregation `mode` (see `aggregate_loss`): the counted tokens for
  token-mean, the rows S for the seq-mean modes, S * max_len for seq-mean-token-sum-norm."""
  if mode == "token-mean":
    return num_tokens
  if mode == "seq-mean-token-sum-norm":
    return num_seqs * max_len
  return num_seqs


def kl_penalty(logp_BxT, ref_logp_BxT, estimator):
  """Per-token KL(pi || ref) estimate: k1 `logp - ref`, k2 `(logp - ref)^2 / 2`,
  k3 `exp(ref - logp) - (ref - logp) - 1`."""
  if estimator not in KL_ESTIMATORS:
    raise ValueError(f"estimator must be one of {KL_ESTIMATORS}; got {estimator!r}")
  d_BxT = logp_BxT - ref_logp_BxT
  if estimator == "k1":
    return d_BxT
  if estimator == "k2":
    return 0.5 * jnp.square(d_BxT)
  return jnp.exp(-d_BxT) + d_BxT - 1.0


def entropy_bonus(entropy_BxT, coef):
  """Per-token loss term `-coef * H` (an entropy bonus baseline; coef 0 by default)."""
  return -coef * entropy_BxT


def _abs_zero_grad_at_zero(x):
  """|x| whose gradient at x = 0 is 0 (as torch's abs), so on-policy KL-Cov is plain PG."""
  return x * jax.lax.stop_gradient(jnp.sign(x))


def _safe_div(num, den):
  return jnp.where(den != 0, num / jnp.where(den != 0, den, 1.0), 0.0)


def policy_loss(
    logp_BxT,
    old_logp_BxT,
    adv_BxT,
    mask_BxT,
    cfg,
    *,
    entropy_BxT=None,
    rng=None,
    selections=None,
    denominator=None,
    ref_logp_BxT=None,
):
  """Per-token loss of `cfg.name`, entropy-masked and aggregated by `cfg.loss_agg_mode`.

  Returns (numerator / denominator, metrics): the denominator is `denominator` when given (e.g.
  `global_denominator` for gradient accumulation), else the local one (`metrics['loss_den']`).
  `selections` (from `select_tokens`, e.g. over the whole update batch) replaces selecting here.
  token_mask 'top_quantile' keeps TRL's denominator (all valid tokens); the other entropy masks
  average over the kept tokens. The advantages are `effective_advantages(adv_BxT, ...)`. The
  KL-to-reference and entropy-bonus terms (`kl_ref_coef`, `entropy_coef`) are not part of this loss
  (the caller adds `kl_penalty` / `entropy_bonus`), except archer's KL on its low-entropy tokens,
  `kl_ref_coef * kl_penalty(logp, ref_logp_BxT)`, which is part of its per-token loss.
  """
  _check_inputs(cfg, logp_BxT, old_logp_BxT, adv_BxT, mask_BxT, entropy_BxT)
  archer_kl = cfg.name == "archer" and cfg.kl_ref_coef > 0
  if archer_kl and ref_logp_BxT is None:
    raise ValueError(
        "ref_logp_BxT is required for config.loss.name='archer' with " "config.loss.kl_ref_coef > 0"
    )
  stats.check_same_shape("logp_BxT", logp_BxT, ref_logp_BxT=ref_logp_BxT)
  if selections is None:
    _check_selection_args(cfg, entropy_BxT, rng)
    selections = select_tokens(
        logp_BxT, old_logp_BxT, adv_BxT, mask_BxT, cfg, entropy_BxT=entropy_BxT, rng=rng
    )
  elif set(selections) != set(SELECTION_KEYS):
    raise ValueError(
        f"selections must have keys {', '.join(SELECTION_KEYS)}; got {sorted(selections)}"
    )
  else:
    stats.check_same_shape(
        "logp_BxT", logp_BxT, **{f"selections['{k}']": v for k, v in selections.items()}
    )
  logp_BxT = logp_BxT.astype(jnp.float32)
  old_logp_BxT = old_logp_BxT.astype(jnp.float32)
  adv_BxT = effective_advantages(adv_BxT, entropy_BxT, mask_BxT, cfg)
  valid_BxT = mask_BxT > 0
  token_mask_BxT = jax.lax.stop_gradient(selections["token_mask"]).astype(jnp.float32)
  selected_BxT = jax.lax.stop_gradient(selections["cov_selected"]).astype(jnp.float32)
  high_BxT = jax.lax.stop_gradient(selections["high_entropy"]).astype(jnp.float32)
  log_ratio_BxT = _log_ratio(logp_BxT, old_logp_BxT, mask_BxT)

  clip_low, clip_high = cfg.clip_ratio_low, cfg.clip_ratio_high
  if cfg.name == "archer":
    clip_low = jnp.where(high_BxT > 0, cfg.archer_high_clip_ratio_low, clip_low)
    clip_high = jnp.where(high_BxT > 0, cfg.archer_high_clip_ratio_high, clip_high)
  if cfg.name == "gspo":
    ratio_BxT = _gspo_ratio(logp_BxT, old_logp_BxT, mask_BxT)
    l1_BxT = -adv_BxT * ratio_BxT
    l2_BxT = -adv_BxT * jnp.clip(ratio_BxT, 1.0 - clip_low, 1.0 + clip_high)
  else:
    # Clip-Cov and KL-Cov use the unclamped ratio, as in the reference.
    ratio_BxT, l1_BxT, l2_BxT = _clip_terms(
        logp_BxT,
        old_logp_BxT,
        adv_BxT,
        mask_BxT,
        clip_low,
        clip_high,
        clamp_log_ratio=cfg.name not in ("clip_cov", "kl_cov"),
    )
  zeros_BxT = jnp.zeros_like(logp_BxT)
  dual_BxT = zeros_BxT
  if cfg.name == "cispo":  # the IS weight is clipped whatever the sign of A
    clip_low_BxT = ratio_BxT < 1.0 - clip_low
    clip_high_BxT = ratio_BxT > 1.0 + clip_high
  elif cfg.name == "kl_cov":
    clip_low_BxT = clip_high_BxT = zeros_BxT
  else:
    clipped_BxT = jnp.maximum(l1_BxT, l2_BxT)
    clip_low_BxT = (adv_BxT < 0) & (ratio_BxT < 1.0 - clip_low)
    clip_high_BxT = (adv_BxT > 0) & (ratio_BxT > 1.0 + clip_high)
  if cfg.name in ("ppo", "archer"):
    dual_bound_BxT = -adv_BxT * cfg.clip_ratio_c
    dual_BxT = (adv_BxT < 0) & (clipped_BxT > dual_bound_BxT)
    loss_BxT = jnp.where(adv_BxT < 0, jnp.minimum(clipped_BxT, dual_bound_BxT), clipped_BxT)
  elif cfg.name == "clip_cov":
    loss_BxT = clipped_BxT * (1.0 - selected_BxT)
  elif cfg.name == "gspo":
    loss_BxT = clipped_BxT
  elif cfg.name == "cispo":
    weight_BxT = jax.lax.stop_gradient(jnp.clip(ratio_BxT, 1.0 - clip_low, 1.0 + clip_high))
    loss_BxT = -weight_BxT * adv_BxT * logp_BxT
  else:
    loss_BxT = l1_BxT + cfg.kl_cov_coef * selected_BxT * _abs_zero_grad_at_zero(log_ratio_BxT)
  if archer_kl:
    ref_logp_BxT = jnp.where(valid_BxT, ref_logp_BxT.astype(jnp.float32), logp_BxT)
    kl_BxT = kl_penalty(logp_BxT, ref_logp_BxT, cfg.kl_ref_estimator)
    loss_BxT = loss_BxT + cfg.kl_ref_coef * (1.0 - high_BxT) * kl_BxT

  if cfg.token_mask == "top_quantile":
    num, den = aggregate_loss(
        jnp.where(token_mask_BxT > 0, loss_BxT, 0.0), mask_BxT, cfg.loss_agg_mode, _max_len(cfg)
    )
  else:
    num, den = aggregate_loss(
        loss_BxT, token_mask_BxT, cfg.loss_agg_mode, _max_len(cfg), response_mask_BxT=mask_BxT
    )
  loss = _safe_div(num, den if denominator is None else denominator)

  sg = jax.lax.stop_gradient
  cov_BxT = stats.token_covariance(logp_BxT, adv_BxT, mask_BxT)
  n = jnp.sum(valid_BxT, dtype=jnp.int32)
  top_cov_BxT = stats.top_k_mask(cov_BxT, valid_BxT, stats.top_count(cfg.kl_cov_ratio, n))
  metrics = {
      "loss_num": sg(num),
      "loss_den": sg(den),
      "clipfrac_low": stats.masked_mean(clip_low_BxT, valid_BxT),
      "clipfrac_high": stats.masked_mean(clip_high_BxT, valid_BxT),
      "clipfrac_dual": stats.masked_mean(dual_BxT, valid_BxT),
      "ppo_kl": stats.masked_mean(sg(-log_ratio_BxT), valid_BxT),
      "abs_dlogp": stats.masked_mean(sg(jnp.abs(log_ratio_BxT)), valid_BxT),
      "n_valid": n.astype(jnp.float32),
      "n_cov_selected": jnp.sum(jnp.where(valid_BxT, selected_BxT, 0.0)),
      "cov_mass_selected": cov_mass_fraction(cov_BxT, selected_BxT, valid_BxT),
      "n_token_mask": jnp.sum(token_mask_BxT),
      "cov_mean": stats.masked_mean(cov_BxT, valid_BxT),
      "cov_selected_mean": stats.masked_mean(cov_BxT, valid_BxT & (selected_BxT > 0)),
      "cov_topk_mean": stats.masked_mean(cov_BxT, top_cov_BxT),
      "cov_frac_in_band": stats.masked_mean(
          (cov_BxT > cfg.clip_cov_lb) & (cov_BxT < cfg.clip_cov_ub), valid_BxT
      ),
      "n_high_entropy": jnp.sum(jnp.where(valid_BxT, high_BxT, 0.0)),
  }
  if archer_kl:
    metrics["kl_ref"] = stats.masked_mean(sg(kl_BxT), valid_BxT & (high_BxT == 0))
  if entropy_BxT is not None:
    entropy_BxT = sg(entropy_BxT).astype(jnp.float32)
    metrics["entropy_mean"] = stats.masked_mean(entropy_BxT, valid_BxT)
    metrics["entropy_selected_mean"] = stats.masked_mean(
        entropy_BxT, valid_BxT & (selected_BxT > 0)
    )
    metrics["entropy_token_mask_mean"] = stats.masked_mean(entropy_BxT, token_mask_BxT)
  return loss, metrics


def cov_mass_fraction(cov_BxT, selected_BxT, valid_BxT):
  """The share of the positive covariance mass sum_t max(cov_t, 0) over valid tokens that the
  selected tokens hold: how much of the entropy-lowering drive Clip-Cov / KL-Cov act on."""
  pos_BxT = jnp.where(valid_BxT, jnp.maximum(jax.lax.stop_gradient(cov_BxT), 0.0), 0.0)
  return _safe_div(jnp.sum(pos_BxT * (selected_BxT > 0)), jnp.sum(pos_BxT))


def global_denominator(mask_BxT, cfg, num_microbatches):
  """Sum over the `num_microbatches` equal row-splits of the `loss_den` that policy_loss reports.

  Depends only on the response mask: entropy masks keep ceil(rho * n) tokens per selection set
  (each micro-batch, or the whole batch for selection_scope='global').
  """
  if mask_BxT.ndim != 2:
    raise ValueError(f"mask_BxT must be [batch, time]; got shape {tuple(mask_BxT.shape)}")
  if (
      not isinstance(num_microbatches, int)
      or num_microbatches < 1
      or mask_BxT.shape[0] % num_microbatches
  ):
    raise ValueError(
        f"num_microbatches must be a positive divisor of the batch size "
        f"{mask_BxT.shape[0]}; got {num_microbatches!r}"
    )
  valid_BxT = mask_BxT > 0
  sets = 1 if cfg.selection_scope == "global" else num_microbatches
  n_S = jnp.sum(valid_BxT.reshape(sets, -1), axis=-1, dtype=jnp.int32)
  if cfg.token_mask in ("all", "top_quantile"):
    kept_S = n_S
  else:
    kept_S = stats.kept_count(cfg.token_mask_rho, n_S)
    if cfg.token_mask == "bottom_entropy":
      kept_S = n_S - kept_S
  num_seqs = jnp.sum(jnp.any(valid_BxT, axis=-1), dtype=jnp.float32)
  return loss_denominator(
      cfg.loss_agg_mode,
      jnp.sum(kept_S).astype(jnp.float32),
      num_seqs,
      _max_len(cfg) or mask_BxT.shape[-1],
  )


def _max_len(cfg):
  """Dr.GRPO's constant: the response budget (`cfg.max_response_len`), or None (the arrays')."""
  return cfg.max_response_len or None
