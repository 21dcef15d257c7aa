"""The RL update: a pure function `update(state, batch, rng) -> (state, metrics)` over pytrees.

One call consumes one rollout. For each of `ppo_epochs` epochs the rollout is split into
`num_minibatches` mini-batches (one AdamW step each) and each mini-batch into `num_microbatches`
micro-batches (gradient accumulation). Every micro-batch loss is divided by the mini-batch's global
denominator (`losses.global_denominator`), so the summed gradient equals the one-big-batch gradient.
Splits are strided (mini-batch m holds rows m, m + M, ...) so every split stays evenly spread over the
data-parallel devices. Log-probs and entropies come from the fused path: hidden states and the
unembedding matrix, never a [tokens, vocab] array.

`make_update` jits it with explicit shardings over the mesh and donates the state.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from entropy_rl import config_lib, losses, models, packing, sharding, stats


@flax.struct.dataclass
class TrainState:
  """The run state. The entropy-control fields are None unless `loss_cfg.adaptive_entropy`."""

  step: jax.Array  # RL steps done (one per rollout)
  params: Any
  opt_state: Any
  # Adaptive entropy control (Skywork-OR1, TRL): the coefficient c_k, float32 [], and the token-mean
  # entropy measured at the last optimizer step (inf before the first: no bonus yet).
  entropy_coef: Any = None
  entropy_last: Any = None

  @classmethod
  def create(cls, params, opt_state, loss_cfg: config_lib.LossConfig) -> TrainState:
    """Step 0; with `loss_cfg.adaptive_entropy`, c_0 = `loss_cfg.entropy_coef` and no entropy yet."""
    step = jnp.zeros((), jnp.int32)
    if not loss_cfg.adaptive_entropy:
      return cls(step, params, opt_state)
    return cls(
        step,
        params,
        opt_state,
        entropy_coef=jnp.asarray(loss_cfg.entropy_coef, jnp.float32),
        entropy_last=jnp.asarray(jnp.inf, jnp.float32),
    )


@flax.struct.dataclass
class Batch:
  """One rollout as the update reads it, N rows of S = P + L tokens (left-padded prompt, then
  response); the per-token fields cover the L response tokens."""

  tokens: jax.Array  # int32 [N, S]
  attn_mask: jax.Array  # int32 [N, S], 1 for real tokens
  response_mask: jax.Array  # float32 [N, L], 1 for response tokens (the stop token included)
  old_logp: jax.Array  # float32 [N, L], the behaviour (sampler's) log-probs
  advantages: jax.Array  # float32 [N, L], the group advantage on every response token
  ref_logp: Any = None  # float32 [N, L], the reference policy's log-probs when a KL term is on
  # The rows packed for the model (`entropy_rl.packing`, `rl.packing`); tokens/attn_mask unread.
  packed: packing.Packed | None = None


def lr_schedule(optim_cfg: config_lib.OptimConfig, total_updates: int) -> optax.Schedule:
  """Linear warmup over `warmup_steps` optimizer updates, then constant or cosine decay to 0."""
  warmup = optax.linear_schedule(0.0, optim_cfg.lr, max(optim_cfg.warmup_steps, 1))
  if optim_cfg.schedule == "constant":
    after = optax.constant_schedule(optim_cfg.lr)
  else:
    after = optax.cosine_decay_schedule(
        optim_cfg.lr, max(total_updates - optim_cfg.warmup_steps, 1)
    )
  if optim_cfg.warmup_steps <= 0:
    return after
  return optax.join_schedules([warmup, after], [optim_cfg.warmup_steps])


def make_optimizer(
    optim_cfg: config_lib.OptimConfig, total_updates: int
) -> optax.GradientTransformation:
  """Global-norm gradient clipping, then AdamW on the schedule."""
  return optax.chain(
      optax.clip_by_global_norm(optim_cfg.grad_clip),
      optax.adamw(
          lr_schedule(optim_cfg, total_updates),
          b1=optim_cfg.b1,
          b2=optim_cfg.b2,
          weight_decay=optim_cfg.weight_decay,
      ),
  )


def response_logprobs(model, model_cfg, params, batch: Batch, temperature: float, chunk_size: int):
  """Teacher-forced log-probs and entropies of the response tokens (the last L of each row), [N, L]:
  from the rows, or from their packed bins when `batch.packed` (the response tokens' values
  gathered back to the rows)."""
  unembed_DxV = models.unembedding(params, model_cfg)
  fused = functools.partial(
      stats.fused_logprobs_and_entropy, temperature=temperature, chunk_size=chunk_size
  )
  if batch.packed is not None:
    bins = batch.packed
    hidden_QxSxD = model.apply(
        {"params": params},
        bins.tokens,
        positions_BxT=bins.positions,
        segments_BxT=bins.segments,
        return_hidden=True,
    )
    # Every position predicts the next token of its bin; only those of the same row are gathered.
    targets_QxS = jnp.roll(bins.tokens, -1, axis=1)
    out = fused(hidden_QxSxD, unembed_DxV.astype(hidden_QxSxD.dtype), targets_QxS)
    return tuple(packing.unpack(x, bins) for x in out)
  hidden_NxSxD = model.apply(
      {"params": params}, batch.tokens, attn_mask_BxT=batch.attn_mask, return_hidden=True
  )
  s, response_len = batch.tokens.shape[1], batch.response_mask.shape[1]
  hidden_NxLxD = hidden_NxSxD[:, s - response_len - 1 : s - 1]
  targets_NxL = batch.tokens[:, s - response_len :]
  return fused(hidden_NxLxD, unembed_DxV.astype(hidden_NxLxD.dtype), targets_NxL)


def logprobs_in_chunks(
    model, model_cfg, params, batch: Batch, num_chunks: int, temperature: float, chunk_size: int
):
  """No-grad response log-probs and entropies of a whole batch, `num_chunks` row-splits at a time."""
  params = jax.lax.stop_gradient(params)

  def body(_, rows):
    return None, response_logprobs(model, model_cfg, params, rows, temperature, chunk_size)

  rows = batch.replace(old_logp=None, advantages=None, ref_logp=None)
  _, out = jax.lax.scan(body, None, sharding.split_rows(rows, num_chunks))
  return sharding.merge_rows(out)


def update(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    *,
    model,
    model_cfg,
    config: config_lib.UpdateConfig,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    rules=(),
) -> tuple[TrainState, dict]:
  """One RL update over a rollout (`batch.ref_logp` is needed when a reference KL is used)."""
  with nn.logical_axis_rules(rules):
    return _update(
        state,
        batch,
        rng,
        model=model,
        model_cfg=model_cfg,
        config=config,
        optimizer=optimizer,
        schedule=schedule,
    )


def _update(state, batch, rng, *, model, model_cfg, config, optimizer, schedule):
  loss_cfg = config.loss
  temperature, chunk_size = config.temperature, config.fused_chunk_size
  forward = functools.partial(
      response_logprobs, model, model_cfg, temperature=temperature, chunk_size=chunk_size
  )
  num_micro = config.num_microbatches
  forward_all = functools.partial(
      logprobs_in_chunks,
      model,
      model_cfg,
      num_chunks=num_micro,
      temperature=temperature,
      chunk_size=chunk_size,
  )

  sampler_logp = batch.old_logp
  if config.recompute_old_logp:
    batch = batch.replace(old_logp=forward_all(state.params, batch)[0])

  archer = loss_cfg.name == "archer"  # its KL (low-entropy tokens only) is inside policy_loss
  bonus = loss_cfg.adaptive_entropy or loss_cfg.entropy_coef > 0

  def micro_loss(params, micro, selections, key, pg_den, tok_den, ent_coef):
    logp, entropy = forward(params, micro)
    mask = micro.response_mask
    loss, metrics = losses.policy_loss(
        logp,
        micro.old_logp,
        micro.advantages,
        mask,
        loss_cfg,
        entropy_BxT=entropy,
        rng=key,
        selections=selections,
        denominator=pg_den,
        ref_logp_BxT=micro.ref_logp if archer and loss_cfg.kl_ref_coef > 0 else None,
    )
    metrics = dict(metrics, pg_loss=loss)
    if loss_cfg.kl_ref_coef > 0 and not archer:
      kl = jnp.sum(losses.kl_penalty(logp, micro.ref_logp, loss_cfg.kl_ref_estimator) * mask)
      loss = loss + loss_cfg.kl_ref_coef * kl / tok_den
      metrics["kl_ref"] = kl / tok_den
    if bonus:
      loss = loss + jnp.sum(losses.entropy_bonus(entropy, ent_coef) * mask) / tok_den
    if loss_cfg.adaptive_entropy:
      metrics["entropy_sum"] = jnp.sum(jax.lax.stop_gradient(entropy) * mask)
    return loss, metrics

  def minibatch_step(state, xs):
    mini, key = xs
    sel_key, loss_key = jax.random.split(key)
    mask = mini.response_mask
    tok_den = jnp.maximum(jnp.sum(mask), 1.0)
    if loss_cfg.selection_scope == "global":
      logp, entropy = forward_all(state.params, mini)
      selections = sharding.split_rows(
          losses.select_tokens(
              logp,
              mini.old_logp,
              mini.advantages,
              mask,
              loss_cfg,
              entropy_BxT=entropy,
              rng=sel_key,
          ),
          num_micro,
      )
      pg_den = losses.global_denominator(mask, loss_cfg, 1)
    else:
      selections = None
      pg_den = losses.global_denominator(
          sharding.split_rows(mask, num_micro).reshape(mask.shape), loss_cfg, num_micro
      )
    micros = sharding.split_rows(mini, num_micro)
    keys = jax.random.split(loss_key, num_micro)
    if loss_cfg.adaptive_entropy:
      ent_coef = losses.applied_entropy_coef(state.entropy_coef, state.entropy_last, loss_cfg)
    else:
      ent_coef = jnp.float32(loss_cfg.entropy_coef)

    def accumulate(grads, xs):
      micro, sel, k = xs
      (loss, metrics), g = jax.value_and_grad(micro_loss, has_aux=True)(
          state.params, micro, sel, k, pg_den, tok_den, ent_coef
      )
      return jax.tree.map(jnp.add, grads, g), dict(metrics, loss=loss)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, metrics = jax.lax.scan(accumulate, zeros, (micros, selections, keys))
    metrics = jax.tree.map(jnp.mean, metrics)
    metrics["loss"] = metrics["loss"] * num_micro  # micro losses share one denominator: sum them
    metrics["pg_loss"] = metrics["pg_loss"] * num_micro
    if loss_cfg.adaptive_entropy:  # the mini-batch's token-mean entropy (ratio of micro sums)
      entropy_mean = metrics.pop("entropy_sum") / jnp.maximum(metrics["n_valid"], 1e-30)
      metrics["entropy_bonus_coef"] = ent_coef
    grad_norm = optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new = state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state)
    if loss_cfg.adaptive_entropy:
      new = new.replace(
          entropy_last=entropy_mean,
          entropy_coef=losses.adaptive_entropy_coef(state.entropy_coef, entropy_mean, loss_cfg),
      )
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(metrics["loss"]) & _all_finite(new.params)
    new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
    # The schedule's own counter: optimizer updates done before this one.
    count = optax.tree_utils.tree_get_all_with_path(state.opt_state, "count")[-1][1]
    metrics.update(
        grad_norm=grad_norm, nonfinite=1.0 - finite.astype(jnp.float32), lr=schedule(count)
    )
    return new, metrics

  num_mini = config.num_minibatches
  start = state
  epoch_metrics = []
  for epoch in range(config.ppo_epochs):
    keys = jax.random.split(jax.random.fold_in(rng, epoch), num_mini)
    state, metrics = jax.lax.scan(
        minibatch_step, state, (sharding.split_rows(batch, num_mini), keys)
    )
    epoch_metrics.append(metrics)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *epoch_metrics)  # [epochs, minibatches]
  out = {k: jnp.mean(v) for k, v in stacked.items()}
  out["nonfinite"] = jnp.max(stacked["nonfinite"])
  if config.skip_nonfinite == "step":
    # A step with any non-finite mini-batch is skipped whole: the state stays exactly as it was
    # (the mini-batches before the bad one, with finite updates, are undone too). This holds the
    # start state through the mini-batch scan; 'minibatch' skips only the bad mini-batches.
    state = jax.tree.map(lambda old, new: jnp.where(out["nonfinite"] > 0, old, new), start, state)
  if loss_cfg.adaptive_entropy:  # the controller after this step (what the next step applies)
    out.update(entropy_coef=state.entropy_coef, entropy_last=state.entropy_last)
  # Sampler vs trainer log-probs at the same parameters: the recomputed old log-probs, or else the
  # first mini-batch of the first epoch (evaluated before any optimizer step).
  if config.recompute_old_logp:
    out["mismatch_logp"] = stats.masked_mean(
        jnp.abs(batch.old_logp - sampler_logp), batch.response_mask
    )
  else:
    out["mismatch_logp"] = stacked["abs_dlogp"][0, 0]
  return state.replace(step=state.step + 1), out


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def init_state(params, optimizer, loss_cfg: config_lib.LossConfig, mesh, param_shardings):
  """Step 0's TrainState, every leaf placed in its sharding (`state_shardings`); returns (state,
  shardings)."""
  init = lambda p: TrainState.create(p, optimizer.init(p), loss_cfg)
  shardings = state_shardings(jax.eval_shape(init, params), optimizer, mesh, param_shardings)
  return jax.jit(init, out_shardings=shardings)(params), shardings


def state_shardings(state: TrainState, optimizer, mesh, param_shardings) -> TrainState:
  """Shardings for the whole state: params by rule, optimizer moments like their params."""
  replicated = NamedSharding(mesh, P())
  opt = optax.tree_map_params(
      optimizer,
      lambda _, s: s,
      state.opt_state,
      param_shardings,
      transform_non_params=lambda _: replicated,
  )
  return TrainState(
      step=replicated,
      params=param_shardings,
      opt_state=opt,
      entropy_coef=jax.tree.map(lambda _: replicated, state.entropy_coef),
      entropy_last=jax.tree.map(lambda _: replicated, state.entropy_last),
  )


# XLA:CPU's default dot kernels (YNNPACK) run the update's [tokens, hidden] x [hidden, out] dots at
# about 60% of their rate for the other shapes; its Eigen dots make the whole update about 10% faster
# (`experiments/bench_update.py`, whose dot floor lists the dots). Only the update is compiled so:
# the sampler's dots, a few rows each, are faster on YNNPACK.
CPU_UPDATE_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def make_update(
    model,
    model_cfg,
    config: config_lib.UpdateConfig,
    optimizer,
    schedule,
    mesh,
    shardings: TrainState,
    rules=(),
):
  """`update` jitted over the mesh (batch rows over ('data', 'fsdp'), the state donated) and
  traced under it, so the model's activation sharding constraints apply."""
  fn = functools.partial(
      update,
      model=model,
      model_cfg=model_cfg,
      config=config,
      optimizer=optimizer,
      schedule=schedule,
      rules=tuple(rules),
  )
  batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
  replicated = NamedSharding(mesh, P())
  on_cpu = mesh.devices.flat[0].platform == "cpu"
  return sharding.under_mesh(
      jax.jit(
          fn,
          in_shardings=(shardings, batch_sharding, replicated),
          out_shardings=(shardings, replicated),
          donate_argnums=0,
          compiler_options=CPU_UPDATE_COMPILER_OPTIONS if on_cpu else None,
      ),
      mesh,
      rules,
  )


def make_reference_logprobs(model, model_cfg, config: config_lib.UpdateConfig, mesh, rules=()):
  """`(ref_params, batch) -> ref_logp [N, L]`, jitted under the mesh: the frozen reference policy's
  response log-probs for the KL term, in as many row chunks as the update's micro-batches."""
  num_chunks = config.num_microbatches * config.num_minibatches
  return sharding.under_mesh(
      jax.jit(
          lambda p, b: logprobs_in_chunks(
              model, model_cfg, p, b, num_chunks, config.temperature, config.fused_chunk_size
          )[0]
      ),
      mesh,
      rules,
  )


# The update's metrics under their logged names; token-selection counts are logged as select/...
METRIC_NAMES = {
    "clipfrac_low": "pg/clipfrac_low",
    "clipfrac_high": "pg/clipfrac_high",
    "ppo_kl": "pg/ppo_kl",
    "pg_loss": "pg/loss",
    "loss": "loss",
    "kl_ref": "kl/ref",
    "grad_norm": "grad_norm",
    "lr": "lr",
    "nonfinite": "nonfinite",
    "mismatch_logp": "mismatch/sampler_vs_trainer_logp",
    "abs_dlogp": "pg/abs_dlogp",
    "entropy_coef": "entropy/adaptive_coef",
    "entropy_last": "entropy/adaptive_measured",
    "entropy_bonus_coef": "entropy/bonus_coef",
}


def logged_metrics(metrics: dict) -> dict:
  """`update`'s metrics (fetched to the host) as floats under their logged names."""
  return {METRIC_NAMES.get(k, f"select/{k}"): float(v) for k, v in metrics.items()}
