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
    checkpoint,
    config_lib,
    distributed,
    fileio,
    interrupt,
    metrics,
    models,
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

SUMMARY_KEYS = (
    "reward/mean",
    "acc",
    "entropy/token_mean",
    "entropy/seq_mean",
    "cov/mean",
    "pg/clipfrac_high",
    "response/len_mean",
    "eval/pass@1",
)


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
    run = config_lib.typed(config)
    config_lib.check_inputs(config)
    fileio.makedirs(workdir)
    primary = jax.process_index() == 0
    with fileio.WorkdirLock(workdir) if primary else contextlib.nullcontext():
      return _train(config, run, workdir, stop)


def device_memory() -> int | None:
  """Bytes one local device may allocate (`memory_stats()['bytes_limit']`), None if unreported."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


def _train(c, run: config_lib.RunConfig, workdir: str, stop: interrupt.StopFlag) -> dict:
  """The loop: `c` for its own settings, the typed `run` for the layers below."""

  def check_stop(step=None):
    if distributed.any_process(stop.requested):  # every host stops together
      raise interrupt.Interrupted(stop.signum or signal.SIGTERM, step)

  mesh = sharding.make_mesh(run.mesh.data, run.mesh.fsdp, run.mesh.tensor)
  rules = sharding.default_rules()
  task = data_lib.make_task(c.task) if c.task.source == "synthetic" else None
  policy, params = policy_lib.build_policy(c, workdir, task, check_stop, mesh, rules)
  c = config_lib.resolve_rows_in_flight(c, jax.device_count(), policy.model_cfg, device_memory())
  run = config_lib.typed(c)
  shard = distributed.process_shard(c.rollout.prompts_per_step, sharding.batch_sharding(mesh))
  source = data_lib.make_source(
      c.task,
      seed=c.seed,
      task=task,
      tokenizer=policy.tokenizer,
      shard_index=shard[0],
      num_shards=shard[1],
  )
  eval_examples = data_lib.make_eval_examples(c, task=task, tokenizer=policy.tokenizer)
  reward_fn = rewards_lib.get_reward_fn(
      c.reward.name,
      task=task,
      num_workers=c.reward.num_workers,
      timeout_s=c.reward.timeout_s,
      format_coef=c.reward.format_coef,
      max_response_len=c.rollout.max_new_tokens,
      overlong_buffer=c.reward.overlong_buffer,
      overlong_penalty=c.reward.overlong_penalty,
  )

  upd_cfg, loss_cfg = run.update, run.update.loss
  total_updates = c.num_steps * upd_cfg.num_minibatches * upd_cfg.ppo_epochs
  schedule = step_lib.lr_schedule(run.optim, total_updates)
  optimizer = step_lib.make_optimizer(run.optim, total_updates)
  param_shardings = sharding.logical_to_mesh_sharding(
      models.param_logical_axes(policy.model_cfg), mesh, rules, params
  )
  params = jax.device_put(params, param_shardings)
  ref_params = params if loss_cfg.kl_ref_coef > 0 else None
  init = lambda p: step_lib.TrainState.create(p, optimizer.init(p), loss_cfg)
  abstract = jax.eval_shape(init, params)
  shardings = step_lib.state_shardings(abstract, optimizer, mesh, param_shardings)
  state = jax.jit(init, out_shardings=shardings)(params)
  update_fn = step_lib.make_update(
      policy.model, policy.model_cfg, upd_cfg, optimizer, schedule, mesh, shardings, rules
  )
  ref_fn = None
  if ref_params is not None:
    ref_fn = sharding.under_mesh(
        jax.jit(
            lambda p, b: step_lib.logprobs_in_chunks(
                policy.model,
                policy.model_cfg,
                p,
                b,
                upd_cfg.num_microbatches * upd_cfg.num_minibatches,
                upd_cfg.temperature,
                upd_cfg.fused_chunk_size,
            )[0]
        ),
        mesh,
        rules,
    )

  ckpt = checkpoint.Checkpointer(
      fileio.join(workdir, "checkpoints"), max_to_keep=c.keep_checkpoints
  )
  carry = {"prev_entropy": None, "nonfinite_streak": 0, "law_points": []}
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(
        abstract_state=jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )
    )
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
  rollouts = rollout_lib.Rollouts(run.rollout, policy, reward_fn, mesh, shard)
  band = jnp.array([loss_cfg.clip_cov_lb, loss_cfg.clip_cov_ub], jnp.float32)
  last: dict = {}

  def save(step: int):
    ckpt.save(
        step,
        state,
        {
            "data": distributed.gather_states(source.get_state()),
            "carry": carry,
            "seed": c.seed,
            "config": json.loads(c.to_json_best_effort()),
        },
    )

  try:
    if start == 0 and c.eval_every > 0 and c.eval.at_start:  # the starting policy, as step 0
      writer.write(
          0,
          rollout_lib.evaluate(
              rollouts,
              state.params,
              eval_examples,
              jax.random.fold_in(base_key, 2**32 - 1),
              run,
              check_stop,
          ),
      )  # no step uses this key
    for step in range(start, c.num_steps):
      check_stop(step)
      done = step + 1
      key = jax.random.fold_in(base_key, step)
      roll_key, update_key, eval_key = jax.random.split(key, 3)
      rollouts.faults = rollout_lib.RewardCounts()
      t0 = time.perf_counter()
      roll, every, draws = rollouts.collect(state.params, source, roll_key, check_stop)
      t1 = time.perf_counter()
      g = c.rollout.num_samples
      adv_N = np.asarray(
          advantages.compute_advantages(
              jnp.asarray(roll.rewards.reshape(-1, g)),
              c.rl.advantage,
              qae_quantile=c.rl.qae_quantile,
          )
      ).reshape(-1)
      batch = make_batch(roll, adv_N, mesh)
      if ref_fn is not None:
        batch["ref_logp"] = ref_fn(ref_params, batch)
      t2 = time.perf_counter()
      rollout_stats = stats.rollout_token_stats(
          to_global(roll.entropy, mesh),
          batch["old_logp"],
          batch["advantages"],
          batch["response_mask"],
          band,
      )
      state, upd = update_fn(state, batch, update_key)
      upd = jax.device_get(upd)
      t3 = time.perf_counter()

      m = {k: float(v) for k, v in jax.device_get(rollout_stats).items()}
      m.update(update_metrics(upd))
      m.update(rollout_lib.reward_metrics(every, roll, g, draws, policy.stop_ids))
      m["entropy/predicted_delta"] = -float(upd["lr"]) * m["cov/mean"]
      if carry["prev_entropy"] is not None:
        m["entropy/actual_delta"] = m["entropy/token_mean"] - carry["prev_entropy"]
      carry["prev_entropy"] = m["entropy/token_mean"]
      faults = rollouts.faults
      n_tokens = float(np.sum(gather(np.array([every.mask.sum()]))))
      m.update(
          {
              "reward/timeouts": float(np.sum(gather(np.array([faults.timeouts])))),
              "reward/errors": float(np.sum(gather(np.array([faults.errors])))),
              "time/rollout": t1 - t0 - faults.seconds,
              "time/reward": faults.seconds,
              "time/advantage_batch": t2 - t1,
              "time/update": t3 - t2,
              "throughput/tokens_per_s": n_tokens / max(t3 - t0, 1e-9),
          }
      )
      if upd["nonfinite"] > 0:
        carry["nonfinite_streak"] += 1
        log.warning(
            "step %d: non-finite loss, gradient or parameters; the update is skipped and "
            "the state left as after step %d (%d in a row)",
            done,
            carry["last_good_step"],
            carry["nonfinite_streak"],
        )
      else:
        carry["nonfinite_streak"], carry["last_good_step"] = 0, done
      carry["law_points"].append([m["entropy/token_mean"], m["acc"]])
      if c.eval_every > 0 and (done % c.eval_every == 0 or done == c.num_steps):
        m.update(rollout_lib.evaluate(rollouts, state.params, eval_examples, eval_key, run))
        m.update(law_hint(carry["law_points"], done))
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
            f"of step {carry['last_good_step']}, the last finite update. Lower config.optim.lr "
            f"(now {c.optim.lr:g}) or check the rewards before resuming"
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
    write_summary(workdir)
  return last


def make_batch(roll: rollout_lib.Rollout, adv_N: np.ndarray, mesh, ref_logp=None) -> dict:
  """The update's input: [prompt | response] tokens and masks, behaviour log-probs, and the
  group advantages broadcast to the response tokens, as global arrays over the batch axes."""
  mask = roll.mask
  batch = {
      "tokens": np.concatenate([roll.prompt, roll.tokens], axis=1).astype(np.int32),
      "attn_mask": np.concatenate([roll.prompt_mask, mask], axis=1).astype(np.int32),
      "response_mask": mask.astype(np.float32),
      "old_logp": roll.logp.astype(np.float32),
      "advantages": (adv_N[:, None] * mask).astype(np.float32),
  }
  return {k: to_global(v, mesh) for k, v in batch.items()}


def write_summary(workdir: str) -> None:
  """End of run: PNG plots of reward, accuracy and entropy vs step, and a markdown summary."""
  path = fileio.join(workdir, metrics.METRICS_FILE)
  metrics.plot_metrics(
      path, ["reward/mean", "acc", "entropy/token_mean"], fileio.join(workdir, "curves.png")
  )
  records = metrics.read_metrics(path)
  eval_keys = sorted({k for r in records for k in r if k.startswith("eval/")})
  table = metrics.summary_table(records, list(dict.fromkeys(SUMMARY_KEYS + tuple(eval_keys))))
  fileio.write_text(fileio.join(workdir, "summary.md"), table + "\n")
  print(table)


def law_hint(points, step: int, window: int = 10, min_windows: int = 3) -> dict:
  """The early-stopping hint: EM's law R = -a exp(H) + b fitted on 10-step means of (token
  entropy, rollout accuracy) so far; its ceiling -a + b is the accuracy predicted at H = 0."""
  from entropy_rl import analysis  # pylint: disable=g-import-not-at-top

  h, r = np.asarray(points, np.float64).T if points else (np.zeros(0), np.zeros(0))
  if len(h) < window * min_windows:
    return {}
  try:
    fit = analysis.fit_law(analysis.window_means(h, window), analysis.window_means(r, window))
  except (RuntimeError, ValueError):  # no convergence yet
    return {}
  log.info(
      "step %d: entropy-performance law R = -%.3f exp(H) + %.3f (R^2 %.2f) predicts an "
      "accuracy ceiling of %.3f at H = 0; recent accuracy %.3f",
      step,
      fit["a"],
      fit["b"],
      fit["r2"],
      fit["ceiling"],
      float(np.mean(r[-window:])),
  )
  return {"law/a": fit["a"], "law/b": fit["b"], "law/r2": fit["r2"], "law/ceiling": fit["ceiling"]}


UPDATE_METRIC_NAMES = {
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


def update_metrics(upd: dict) -> dict:
  """The update's metrics under their logged names (token-selection counts as select/...)."""
  return {UPDATE_METRIC_NAMES.get(k, f"select/{k}"): float(v) for k, v in upd.items()}
