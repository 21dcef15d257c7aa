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

from entropy_rl import losses, models, stats


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # RL steps done (one per rollout)
  params: Any
  opt_state: Any


def lr_schedule(optim_cfg, total_updates: int) -> optax.Schedule:
  """Linear warmup over `warmup_steps` optimizer updates, then constant or cosine decay to 0."""
  warmup = optax.linear_schedule(0.0, optim_cfg.lr, max(optim_cfg.warmup_steps, 1))
  if optim_cfg.schedule == "constant":
    after = optax.constant_schedule(optim_cfg.lr)
  else:
    after = optax.cosine_decay_schedule(optim_cfg.lr, max(total_updates - optim_cfg.warmup_steps, 1))
  if optim_cfg.warmup_steps <= 0:
    return after
  return optax.join_schedules([warmup, after], [optim_cfg.warmup_steps])


def make_optimizer(optim_cfg, total_updates: int) -> optax.GradientTransformation:
  """Global-norm gradient clipping, then AdamW on the schedule."""
  return optax.chain(
      optax.clip_by_global_norm(optim_cfg.grad_clip),
      optax.adamw(lr_schedule(optim_cfg, total_updates), b1=optim_cfg.b1, b2=optim_cfg.b2,
                  weight_decay=optim_cfg.weight_decay))


def response_logprobs(model, model_cfg, params, tokens_NxS, attn_mask_NxS, response_len: int,
                      temperature: float, chunk_size: int):
  """Teacher-forced log-probs and entropies of the response tokens (the last `response_len`)."""
  hidden_NxSxD = model.apply({"params": params}, tokens_NxS, attn_mask_BxT=attn_mask_NxS,
                             return_hidden=True)
  s = tokens_NxS.shape[1]
  hidden_NxLxD = hidden_NxSxD[:, s - response_len - 1:s - 1]
  targets_NxL = tokens_NxS[:, s - response_len:]
  unembed_DxV = models.unembedding(params, model_cfg).astype(hidden_NxLxD.dtype)
  return stats.fused_logprobs_and_entropy(hidden_NxLxD, unembed_DxV, targets_NxL, temperature=temperature,
                                          chunk_size=chunk_size)


def logprobs_in_chunks(model, model_cfg, params, batch: dict, num_chunks: int, temperature: float,
                       chunk_size: int):
  """No-grad response log-probs and entropies of a whole batch, `num_chunks` row-splits at a time."""
  response_len = batch["response_mask"].shape[1]
  params = jax.lax.stop_gradient(params)

  def body(_, rows):
    return None, response_logprobs(model, model_cfg, params, rows["tokens"], rows["attn_mask"],
                                   response_len, temperature, chunk_size)

  rows = {k: batch[k] for k in ("tokens", "attn_mask", "response_mask")}
  _, out = jax.lax.scan(body, None, split_rows(rows, num_chunks))
  return merge_rows(out)


def split_rows(tree, num: int):
  """[N, ...] -> [num, N / num, ...], strided: split i holds rows i, i + num, ..."""
  def f(x):
    return jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1)
  return jax.tree.map(f, tree)


def merge_rows(tree):
  """Inverse of `split_rows`."""
  def f(x):
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])
  return jax.tree.map(f, tree)


def update(state: TrainState, batch: dict, rng: jax.Array, *, model, model_cfg, config,
           optimizer: optax.GradientTransformation, schedule: optax.Schedule,
           rules=()) -> tuple[TrainState, dict]:
  """One RL update over a rollout.

  batch: `tokens` [N, S] (left-padded prompt then response), `attn_mask` [N, S], `response_mask`,
  `old_logp` (the sampler's), `advantages` [N, L], and `ref_logp` [N, L] when a reference KL is used.
  """
  with nn.logical_axis_rules(rules):
    return _update(state, batch, rng, model=model, model_cfg=model_cfg, config=config,
                   optimizer=optimizer, schedule=schedule)


def _update(state, batch, rng, *, model, model_cfg, config, optimizer, schedule):
  loss_cfg, rl = config.loss, config.rl
  response_len = batch["response_mask"].shape[1]
  forward = functools.partial(response_logprobs, model, model_cfg, response_len=response_len,
                              temperature=config.rollout.temperature,
                              chunk_size=rl.fused_chunk_size)
  num_micro = rl.num_microbatches
  forward_all = functools.partial(logprobs_in_chunks, model, model_cfg, num_chunks=num_micro,
                                  temperature=config.rollout.temperature,
                                  chunk_size=rl.fused_chunk_size)

  sampler_logp = batch["old_logp"]
  if rl.recompute_old_logp:
    batch = dict(batch, old_logp=forward_all(state.params, batch)[0])

  def micro_loss(params, micro, selections, key, pg_den, tok_den):
    logp, entropy = forward(params, micro["tokens"], micro["attn_mask"])
    mask = micro["response_mask"]
    loss, metrics = losses.policy_loss(
        logp, micro["old_logp"], micro["advantages"], mask, loss_cfg, entropy_BxT=entropy,
        rng=key, selections=selections, denominator=pg_den)
    metrics = dict(metrics, pg_loss=loss,
                   abs_dlogp=stats.masked_mean(jnp.abs(logp - micro["old_logp"]), mask))
    if loss_cfg.kl_ref_coef > 0:
      kl = jnp.sum(losses.kl_penalty(logp, micro["ref_logp"], loss_cfg.kl_ref_estimator) * mask)
      loss = loss + loss_cfg.kl_ref_coef * kl / tok_den
      metrics["kl_ref"] = kl / tok_den
    if loss_cfg.entropy_coef > 0:
      loss = loss + jnp.sum(losses.entropy_bonus(entropy, loss_cfg.entropy_coef) * mask) / tok_den
    return loss, metrics

  def minibatch_step(state, xs):
    mini, key = xs
    sel_key, loss_key = jax.random.split(key)
    mask = mini["response_mask"]
    tok_den = jnp.maximum(jnp.sum(mask), 1.0)
    if loss_cfg.selection_scope == "global":
      logp, entropy = forward_all(state.params, mini)
      selections = split_rows(losses.select_tokens(
          logp, mini["old_logp"], mini["advantages"], mask, loss_cfg, entropy_BxT=entropy,
          rng=sel_key), num_micro)
      pg_den = losses.global_denominator(mask, loss_cfg, 1)
    else:
      selections = None
      pg_den = losses.global_denominator(split_rows(mask, num_micro).reshape(mask.shape),
                                         loss_cfg, num_micro)
    micros = split_rows(mini, num_micro)
    keys = jax.random.split(loss_key, num_micro)

    def accumulate(grads, xs):
      micro, sel, k = xs
      (loss, metrics), g = jax.value_and_grad(micro_loss, has_aux=True)(
          state.params, micro, sel, k, pg_den, tok_den)
      return jax.tree.map(jnp.add, grads, g), dict(metrics, loss=loss)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, metrics = jax.lax.scan(accumulate, zeros, (micros, selections, keys))
    metrics = jax.tree.map(jnp.mean, metrics)
    metrics["loss"] = metrics["loss"] * num_micro  # micro losses share one denominator: sum them
    metrics["pg_loss"] = metrics["pg_loss"] * num_micro
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(metrics["loss"])
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new = TrainState(state.step, optax.apply_updates(state.params, updates), opt_state)
    new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
    # The schedule's own counter: optimizer updates done before this one.
    count = optax.tree_utils.tree_get_all_with_path(state.opt_state, "count")[-1][1]
    metrics.update(grad_norm=grad_norm, nonfinite=1.0 - finite.astype(jnp.float32),
                   lr=schedule(count))
    return new, metrics

  num_mini = rl.num_minibatches
  epoch_metrics = []
  for epoch in range(rl.ppo_epochs):
    keys = jax.random.split(jax.random.fold_in(rng, epoch), num_mini)
    state, metrics = jax.lax.scan(minibatch_step, state, (split_rows(batch, num_mini), keys))
    epoch_metrics.append(metrics)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *epoch_metrics)  # [epochs, minibatches]
  out = {k: jnp.mean(v) for k, v in stacked.items()}
  out["nonfinite"] = jnp.max(stacked["nonfinite"])
  # Sampler vs trainer log-probs at the same parameters: the recomputed old log-probs, or else the
  # first mini-batch of the first epoch (evaluated before any optimizer step).
  if rl.recompute_old_logp:
    out["mismatch_logp"] = stats.masked_mean(jnp.abs(batch["old_logp"] - sampler_logp),
                                             batch["response_mask"])
  else:
    out["mismatch_logp"] = stacked["abs_dlogp"][0, 0]
  return state.replace(step=state.step + 1), out


def state_shardings(state: TrainState, optimizer, mesh, param_shardings) -> TrainState:
  """Shardings for the whole state: params by rule, optimizer moments like their params."""
  replicated = NamedSharding(mesh, P())
  opt = optax.tree_map_params(optimizer, lambda _, s: s, state.opt_state, param_shardings,
                              transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, params=param_shardings, opt_state=opt)


def make_update(model, model_cfg, config, optimizer, schedule, mesh, shardings: TrainState,
                rules=()):
  """`update` jitted over the mesh: batch rows over ('data', 'fsdp'), the state donated."""
  fn = functools.partial(update, model=model, model_cfg=model_cfg, config=config,
                         optimizer=optimizer, schedule=schedule, rules=tuple(rules))
  batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
  replicated = NamedSharding(mesh, P())
  return jax.jit(fn, in_shardings=(shardings, batch_sharding, replicated),
                 out_shardings=(shardings, replicated), donate_argnums=0)
