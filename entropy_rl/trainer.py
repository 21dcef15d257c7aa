"""The RL loop: rollout -> reward -> advantage -> update -> log -> checkpoint.

All mutable state lives in `train`: the TrainState (params, optimizer state, step), the prompt
source's position and a few scalars carried between steps. Each step's randomness is
`fold_in(key(seed), step)`, so a resumed run repeats an uninterrupted one exactly.

Nothing finished is lost: the workdir is locked against a second run; SIGINT / SIGTERM stop at
the next safe point with the last completed step checkpointed (`interrupt.Interrupted`); a failed
checkpoint write stops the run when it happens; a step with a non-finite update is skipped whole.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from entropy_rl import (
    advantages,
    analysis,
    checkpoint,
    config_lib,
    distributed,
    fileio,
    interrupt,
    metrics,
    models,
    packing,
    policy as policy_lib,
    rollout as rollout_lib,
    sharding,
    stats,
    step as step_lib,
)
from entropy_rl import data as data_lib
from entropy_rl import rewards as rewards_lib
from entropy_rl.distributed import gather, to_global

log = logging.getLogger(__name__)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the RL run described by `config` in `workdir`; returns the last metrics.

  Raises `interrupt.Interrupted` after checkpointing when stopped by SIGINT / SIGTERM, and
  `config_lib.ConfigError` (within seconds, before anything slow) for bad config or input.
  """
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  workdir = fileio.resolve(workdir)
  with interrupt.StopFlag() as stop:
    distributed.maybe_initialize(config.distributed)
    config_lib.validate(config, jax.device_count())
    config = config_lib.resolve_microbatches(config, jax.device_count())
    run = config_lib.typed(config, jax.device_count())
    config_lib.check_inputs(config)
    fileio.makedirs(workdir)
    primary = jax.process_index() == 0
    with fileio.WorkdirLock(workdir) if primary else contextlib.nullcontext():
      return _train(config, run, workdir, stop)


def _train(c, run: config_lib.RunConfig, workdir: str, stop: interrupt.StopFlag) -> dict:
  """The loop: `c` for its own settings, the typed `run` for the layers below."""

  def check_stop(step=None):
    if distributed.any_process(stop.requested):  # every host stops together
      raise interrupt.Interrupted(stop.signum or signal.SIGTERM, step)

  # 1. The policy, its data and rewards, the train state and the jitted programs.
  mesh = sharding.make_mesh(run.mesh.data, run.mesh.fsdp, run.mesh.tensor)
  rules = sharding.default_rules()
  task = data_lib.make_task(c.task) if c.task.source == "synthetic" else None
  policy, params = policy_lib.build_policy(c, workdir, task, check_stop, mesh, rules)
  memory = distributed.device_memory()
  c = config_lib.resolve_rows_in_flight(c, jax.device_count(), policy.model_cfg, memory)
  run = config_lib.typed(c, jax.device_count())
  shard = distributed.process_shard(c.rollout.prompts_per_step, sharding.batch_sharding(mesh))
  kw = dict(seed=c.seed, task=task, tokenizer=policy.tokenizer)
  source = data_lib.make_source(c.task, shard_index=shard[0], num_shards=shard[1], **kw)
  eval_examples = data_lib.make_eval_examples(c, task=task, tokenizer=policy.tokenizer)
  reward_fn = rewards_lib.from_config(c.reward, task, c.rollout.max_new_tokens)
  upd_cfg, loss_cfg = run.update, run.update.loss
  total_updates = c.num_steps * upd_cfg.num_minibatches * upd_cfg.ppo_epochs
  schedule = step_lib.lr_schedule(run.optim, total_updates)
  optimizer = step_lib.make_optimizer(run.optim, total_updates)
  param_shardings = sharding.logical_to_mesh_sharding(
      models.param_logical_axes(policy.model_cfg), mesh, rules, params
  )
  params = jax.device_put(params, param_shardings)
  ref_params = params if loss_cfg.kl_ref_coef > 0 else None
  state, shardings = step_lib.init_state(params, optimizer, loss_cfg, mesh, param_shardings)
  update_fn = step_lib.make_update(
      policy.model, policy.model_cfg, upd_cfg, optimizer, schedule, mesh, shardings, rules
  )
  if ref_params is not None:
    ref_fn = step_lib.make_reference_logprobs(policy.model, policy.model_cfg, upd_cfg, mesh, rules)
  rollouts = rollout_lib.Rollouts(run.rollout, policy, reward_fn, mesh, shard)
  band = jnp.array([loss_cfg.clip_cov_lb, loss_cfg.clip_cov_ub], jnp.float32)
  pack_groups = upd_cfg.num_minibatches * upd_cfg.num_microbatches if c.rl.packing else 0

  # 2. Resume from the newest intact checkpoint.
  ckpt = checkpoint.Checkpointer(
      fileio.join(workdir, "checkpoints"), max_to_keep=c.keep_checkpoints
  )
  carry = {"prev_entropy": None, "nonfinite_streak": 0, "law_points": []}
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(abstract_state=state)
    data_states = meta.get("data", {})  # equal on every host (see data/sources.py)
    source.set_state(data_states.get(str(jax.process_index()), data_states.get("0", {})))
    carry.update(meta["carry"])
    log.info("resumed from step %d", int(state.step))
  start = int(state.step)
  carry.setdefault("last_good_step", start)
  # A rerun replaces what an earlier run wrote after the checkpoint it resumes from.
  writer = metrics.MetricsWriter(workdir, first_step=start + 1 if start else 0)
  bar = metrics.ProgressBar(total=c.num_steps, initial=start)
  base_key = jax.random.key(c.seed)
  last: dict = {}

  def save(step: int):
    data = distributed.gather_states(source.get_state())
    config_json = json.loads(c.to_json_best_effort())
    ckpt.save(step, state, {"data": data, "carry": carry, "seed": c.seed, "config": config_json})

  try:
    if start == 0 and c.eval_every > 0 and c.eval.at_start:  # the starting policy, as step 0
      eval_key = jax.random.fold_in(base_key, 2**32 - 1)  # no step uses this key
      writer.write(
          0,
          rollout_lib.evaluate(rollouts, state.params, eval_examples, eval_key, run, check_stop),
      )
    for step in range(start, c.num_steps):
      check_stop(step)
      done = step + 1
      roll_key, update_key, eval_key = jax.random.split(jax.random.fold_in(base_key, step), 3)
      rollouts.faults = rollout_lib.RewardCounts()

      # 3. Rollout and rewards (dynamic sampling may draw several batches).
      t0 = time.perf_counter()
      roll, every, draws = rollouts.collect(state.params, source, roll_key, check_stop)
      t1 = time.perf_counter()

      # 4. Group advantages, the update's batch, the reference log-probs.
      g = c.rollout.num_samples
      adv_N = advantages.compute_advantages(
          jnp.asarray(roll.rewards.reshape(-1, g)), c.rl.advantage, qae_quantile=c.rl.qae_quantile
      )
      trimmed = roll.trimmed(c.rl.length_bucket)  # no compute on the padding rows share
      batch = make_batch(trimmed, np.asarray(adv_N).reshape(-1), mesh, pack_groups)
      if ref_params is not None:
        batch = batch.replace(ref_logp=ref_fn(ref_params, batch))
      t2 = time.perf_counter()

      # 5. The update, and the entropy mechanism's statistics of the rollout it learns from.
      entropy = to_global(trimmed.entropy, mesh)
      rollout_stats = stats.rollout_token_stats(
          entropy, batch.old_logp, batch.advantages, batch.response_mask, band
      )
      state, upd = update_fn(state, batch, update_key)
      upd = jax.device_get(upd)
      t3 = time.perf_counter()

      # 6. Metrics: entropy dynamics, rewards, faults, times.
      m = {k: float(v) for k, v in jax.device_get(rollout_stats).items()}
      m.update(step_lib.logged_metrics(upd))
      m.update(rollout_lib.reward_metrics(every, roll, g, draws, policy.stop_ids))
      m["entropy/predicted_delta"] = -float(upd["lr"]) * m["cov/mean"]
      if batch.packed is not None:  # the model's tokens, packed, over the rows' padded tokens
        m["update/packed_token_fraction"] = batch.packed.tokens.size / batch.tokens.size
      if carry["prev_entropy"] is not None:
        m["entropy/actual_delta"] = m["entropy/token_mean"] - carry["prev_entropy"]
      carry["prev_entropy"] = m["entropy/token_mean"]
      faults = rollouts.faults
      total = lambda x: float(np.sum(gather(np.array([x]))))  # summed over hosts
      m.update(
          {
              "reward/timeouts": total(faults.timeouts),
              "reward/errors": total(faults.errors),
              "time/rollout": t1 - t0 - faults.seconds,
              "time/reward": faults.seconds,
              "time/advantage_batch": t2 - t1,
              "time/update": t3 - t2,
              "throughput/tokens_per_s": total(every.mask.sum()) / max(t3 - t0, 1e-9),
          }
      )
      if upd["nonfinite"] > 0:
        carry["nonfinite_streak"] += 1
        log.warning(
            "step %d: non-finite loss, gradient or parameters; %s (%d in a row)",
            done,
            (
                f"the update is skipped and the state left as after step {carry['last_good_step']}"
                if upd_cfg.skip_nonfinite == "step"
                else "the non-finite mini-batches are skipped (config.rl.skip_nonfinite)"
            ),
            carry["nonfinite_streak"],
        )
      else:
        carry["nonfinite_streak"], carry["last_good_step"] = 0, done
      carry["law_points"].append([m["entropy/token_mean"], m["acc"]])

      # 7. Evaluation, logging, checkpoints.
      if c.eval_every > 0 and (done % c.eval_every == 0 or done == c.num_steps):
        m.update(rollout_lib.evaluate(rollouts, state.params, eval_examples, eval_key, run))
        m.update(analysis.law_hint(carry["law_points"], done))
      writer.write(done, m)
      bar.update(done, m)
      last = m
      ckpt.check()
      if carry["nonfinite_streak"] >= c.max_nonfinite_steps:
        save(done)
        ckpt.wait_until_finished()
        raise FloatingPointError(
            f"{carry['nonfinite_streak']} non-finite updates in a row (config.max_nonfinite_steps="
            f"{c.max_nonfinite_steps}); they were skipped, so checkpoint {done} holds the state "
            f"of step {carry['last_good_step']}, the last finite update"
            f"{'' if upd_cfg.skip_nonfinite == 'step' else ' and the finite mini-batches since'}. "
            f"Lower config.optim.lr (now {c.optim.lr:g}) or check the rewards before resuming"
        )
      if done % c.checkpoint_every == 0 or done == c.num_steps:
        save(done)
  except interrupt.Interrupted as e:
    save(int(state.step))  # the last completed step (a no-op if already saved)
    raise interrupt.Interrupted(e.signum, int(state.step)) from None
  finally:
    try:
      ckpt.close()
    finally:
      writer.close()
      reward_fn.close()
      bar.close()
  if jax.process_index() == 0 and int(state.step) == c.num_steps:
    print(metrics.write_summary(workdir))
  return last


def make_batch(
    roll: rollout_lib.Rollout, adv_N: np.ndarray, mesh, pack_groups: int = 0
) -> step_lib.Batch:
  """The update's input from a rollout: [prompt | response] tokens and masks, behaviour
  log-probs, the group advantages broadcast to the response tokens; global arrays over the mesh.
  With `pack_groups` (the update's mini- x micro-batches) the rows are also packed for the model."""
  mask = roll.mask.astype(np.float32)
  batch = step_lib.Batch(
      tokens=np.concatenate([roll.prompt, roll.tokens], axis=1).astype(np.int32),
      attn_mask=np.concatenate([roll.prompt_mask, roll.mask], axis=1).astype(np.int32),
      response_mask=mask,
      old_logp=roll.logp.astype(np.float32),
      advantages=(adv_N[:, None] * mask).astype(np.float32),
  )
  if pack_groups:
    packed = packing.pack(
        batch.tokens,
        batch.attn_mask,
        mask.shape[1],
        groups=pack_groups,
        shards=sharding.row_shards(mesh),
    )
    batch = batch.replace(packed=packed)
  return jax.tree.map(lambda x: to_global(x, mesh), batch)
