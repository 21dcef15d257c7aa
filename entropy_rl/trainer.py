"""The RL loop: rollout -> reward -> advantage -> update -> log -> checkpoint.

All mutable state lives in `train`: the TrainState (params, optimizer state, step), the prompt
source's position and a few scalars carried between steps. Each step's randomness is
`fold_in(key(seed), step)`, so a resumed run repeats an uninterrupted one exactly.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from entropy_rl import (advantages, checkpoint, config_lib, distributed, metrics, models,
                        sampling, sharding, stats, step as step_lib)
from entropy_rl import data as data_lib
from entropy_rl import rewards as rewards_lib

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- building blocks


@dataclasses.dataclass
class Policy:
  """What the loop needs to know about the model: static parts only (params live in the state)."""
  model: Any
  model_cfg: models.ModelConfig
  tokenizer: Any
  stop_ids: tuple[int, ...]
  pad_id: int


def build_policy(config, workdir: str, task) -> tuple[Policy, Any]:
  """The tiny policy (warm-started on the synthetic task, cached in the workdir) or an HF model."""
  if config.model.source == "hf":
    from entropy_rl.models import hf
    model, params = hf.load_hf(config.model.hf_path, dtype=config.model.dtype,
                               param_dtype=config.model.param_dtype, remat=config.model.remat)
    tokenizer = hf.load_tokenizer(config.model.hf_path)
    model_cfg = model.config
  else:
    tokenizer = process_zero_first(
        "tokenizer", lambda: data_lib.build_tokenizer(os.path.join(workdir, "tokenizer")))
    model_cfg = tiny_model_config(config.model, len(tokenizer))
    model = models.Decoder(model_cfg)
    if config.warm_start.enabled:
      from entropy_rl import warmstart
      params, info = process_zero_first("warm_start", lambda: warmstart.warm_start(
          model_cfg, task, tokenizer, workdir=os.path.join(workdir, "warm_start"),
          steps=config.warm_start.steps, batch_size=config.warm_start.batch_size,
          lr=config.warm_start.lr, corrupt_prob=config.warm_start.corrupt_prob,
          seed=config.warm_start.seed,
          max_new_tokens=config.rollout.max_new_tokens, max_prompt_len=config.task.max_prompt_len))
      log.info("warm start: %s", info)
    else:
      params = models.init_params(model_cfg, jax.random.key(config.seed))
  stop_ids = tuple(i for i in {tokenizer.eos_token_id} if i is not None)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
  return Policy(model, model_cfg, tokenizer, stop_ids, pad_id), params


def process_zero_first(name: str, fn):
  """fn() on process 0, then, after a barrier, on the others: what it caches in a shared workdir
  (tokenizer, warm start) is written once and read complete (a host-local workdir is rebuilt)."""
  if jax.process_count() == 1:
    return fn()
  out = fn() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices(f"entropy_rl:{name}")
  return out if jax.process_index() == 0 else fn()


def tiny_model_config(c, vocab_size: int) -> models.ModelConfig:
  return models.ModelConfig(
      vocab_size=vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
      num_layers=c.num_layers, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
      head_dim=c.head_dim, model_type="qwen2", tie_word_embeddings=True, dtype=c.dtype,
      param_dtype=c.param_dtype, remat=c.remat, max_position_embeddings=1024)


def to_global(x_local: np.ndarray, mesh) -> jax.Array:
  """This host's rows -> a global array with rows over ('data', 'fsdp')."""
  return jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), x_local)


def to_local(x: jax.Array) -> np.ndarray:
  """The rows of a row-sharded global array that this host holds, in order."""
  if x.is_fully_addressable:
    return np.asarray(x)
  shards = {s.index[0].start or 0: s for s in x.addressable_shards}
  return np.concatenate([np.asarray(shards[k].data) for k in sorted(shards)])


def gather(x: np.ndarray) -> np.ndarray:
  """Concatenate a small per-host array over hosts (identity on one host)."""
  if jax.process_count() == 1:
    return x
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@jax.jit
def token_stats(entropy_NxL, logp_NxL, adv_NxL, mask_NxL, band):
  """Rollout token statistics (DESIGN.md section 6) at the sampling policy."""
  out = {f"entropy/{k}": v for k, v in stats.entropy_summary(entropy_NxL, mask_NxL).items()}
  cov_NxL = stats.token_covariance(logp_NxL, adv_NxL, mask_NxL)
  valid = mask_NxL > 0
  n = jnp.sum(valid)
  top = stats.top_k_mask(cov_NxL, valid, jnp.maximum(stats.fraction_count(0.02, n, "floor"), 1))
  out["cov/mean"] = stats.masked_mean(cov_NxL, valid)
  out["cov/topk_mean"] = stats.masked_mean(cov_NxL, top)  # the top 2% of tokens by covariance
  out["cov/frac_in_band"] = stats.masked_mean((cov_NxL > band[0]) & (cov_NxL < band[1]), valid)
  return out


# ----------------------------------------------------------------------------- rollouts


class Rollouts:
  """Sampling and scoring G responses per prompt with the current parameters."""

  def __init__(self, config, policy: Policy, reward_fn, mesh, shard: tuple[int, int] = (0, 1)):
    self.config, self.policy, self.reward_fn, self.mesh = config, policy, reward_fn, mesh
    # This host feeds block shard[0] of shard[1] equal row blocks of every global prompt batch.
    self.shard_index, self.num_shards = shard

  reward_seconds = 0.0  # time spent in the reward function, read and reset by the loop

  def generate(self, params, examples, key, *, num_samples, temperature, max_new_tokens,
               greedy=False):
    c, pol = self.config, self.policy
    prompt_BxP, pmask_BxP = data_lib.encode_prompts(
        pol.tokenizer, [ex.prompt for ex in examples], c.task.max_prompt_len)
    out = sampling.sample(
        pol.model, params, to_global(prompt_BxP, self.mesh), to_global(pmask_BxP, self.mesh), key,
        num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=c.rollout.top_p, top_k=c.rollout.top_k, greedy=greedy, stop_ids=pol.stop_ids,
        pad_id=pol.pad_id, return_entropy=True)
    tokens, mask = to_local(out.tokens_NxL), to_local(out.mask_NxL)
    texts = data_lib.decode_responses(pol.tokenizer, tokens, mask)
    repeated = [ex for ex in examples for _ in range(num_samples)]
    t0 = time.perf_counter()
    rewards, info = self.reward_fn(repeated, texts, lengths=mask.sum(1))
    self.reward_seconds += time.perf_counter() - t0
    return out, dict(tokens=tokens, mask=mask, texts=texts, rewards=np.asarray(rewards, np.float32),
                     correct=np.asarray(info.get("correct", rewards), np.float32), info=info)

  def collect(self, params, source, key):
    """One step's rollout; with dynamic sampling, groups whose rewards all agree are replaced."""
    c = self.config
    b = c.rollout.prompts_per_step // self.num_shards
    g = c.rollout.num_samples
    draws, kept, spare, drawn = 0, [], [], []
    while True:
      examples = source.next_batch(b)
      out, host = self.generate(params, examples, jax.random.fold_in(key, draws), num_samples=g,
                                temperature=c.rollout.temperature,
                                max_new_tokens=c.rollout.max_new_tokens)
      draws += 1
      local = {"prompt": to_local(out.prompt_NxP), "prompt_mask": to_local(out.prompt_mask_NxP),
               "tokens": host["tokens"], "mask": host["mask"].astype(np.float32),
               "logp": to_local(out.logprobs_NxL), "entropy": to_local(out.entropy_NxL),
               "rewards": host["rewards"], "correct": host["correct"]}
      drawn.append(local)
      for i in range(b):
        group = {k: v[i * g:(i + 1) * g] for k, v in local.items()}
        informative = np.ptp(group["rewards"]) > 0
        (kept if informative or not c.rl.dynamic_sampling else spare).append(group)
      if not c.rl.dynamic_sampling:
        break
      enough = int(np.min(gather(np.array([len(kept) >= b], np.int32))))
      if enough or draws >= c.rl.dynamic_sampling_max_draws:
        break
    groups = (kept + spare)[:b]
    batch = {k: np.concatenate([grp[k] for grp in groups]) for k in groups[0]}
    every = {k: np.concatenate([d[k] for d in drawn]) for k in ("rewards", "correct", "mask")}
    return batch, every, draws


# ----------------------------------------------------------------------------- evaluation


def evaluate(rollouts: Rollouts, params, eval_examples, key, c) -> dict:
  """eval/pass@1 (greedy), eval/avg@k and unbiased eval/pass@k over k samples, eval/entropy.

  `eval_examples` is the whole list on every host, evaluated in global chunks of
  `prompts_per_step` prompts (the last one padded) of which each host feeds its block of rows.
  """
  k = c.eval.num_samples
  max_new = c.eval.max_new_tokens if c.eval.max_new_tokens > 0 else c.rollout.max_new_tokens
  chunk_size = c.rollout.prompts_per_step
  b = chunk_size // rollouts.num_shards
  greedy, correct, valid, ent_sum, tok = [], [], [], 0.0, 0.0
  for start in range(0, len(eval_examples), chunk_size):
    first = start + rollouts.shard_index * b
    chunk = list(eval_examples[first:first + b])
    n = len(chunk)
    chunk += [eval_examples[0]] * (b - n)  # static shapes; padded prompts are dropped below
    key, k1, k2 = jax.random.split(key, 3)
    _, g = rollouts.generate(params, chunk, k1, num_samples=1, temperature=1.0,
                             max_new_tokens=max_new, greedy=True)
    out, s = rollouts.generate(params, chunk, k2, num_samples=k, temperature=c.eval.temperature,
                               max_new_tokens=max_new)
    greedy.append(g["correct"])
    correct.append(s["correct"].reshape(b, k))
    valid.append(np.arange(b) < n)
    ent = to_local(out.entropy_NxL)[:n * k]
    m = s["mask"][:n * k]
    ent_sum += float(np.sum(ent * m))
    tok += float(np.sum(m))
  valid = gather(np.concatenate(valid))  # every host gathers arrays of one shape
  greedy = gather(np.concatenate(greedy))[valid]
  correct = gather(np.concatenate(correct))[valid]
  ent = gather(np.array([ent_sum, tok]))
  ent = ent.reshape(-1, 2).sum(0)
  return {
      "eval/pass@1": float(np.mean(greedy)),
      f"eval/avg@{k}": float(np.mean(correct)),
      f"eval/pass@{k}": rewards_lib.mean_pass_at_k(correct, k),
      "eval/entropy": float(ent[0] / max(ent[1], 1.0)),
  }


# ----------------------------------------------------------------------------- the loop


def _build_batch(host: dict, adv_N: np.ndarray, mesh, ref_logp=None) -> dict:
  mask = host["mask"]
  batch = {
      "tokens": np.concatenate([host["prompt"], host["tokens"]], axis=1).astype(np.int32),
      "attn_mask": np.concatenate([host["prompt_mask"], mask], axis=1).astype(np.int32),
      "response_mask": mask.astype(np.float32),
      "old_logp": host["logp"].astype(np.float32),
      "advantages": (adv_N[:, None] * mask).astype(np.float32),
  }
  return {k: to_global(v, mesh) for k, v in batch.items()}


def _install_signal_handlers(flag: dict):
  def handler(signum, frame):
    del frame
    flag["signal"] = signum
  previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
  return previous


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the RL run described by `config` in `workdir`; returns the last metrics."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  distributed.maybe_initialize(config.distributed)
  config_lib.validate(config, jax.device_count())
  if "://" not in workdir:
    os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  rules = sharding.default_rules()
  c = config

  task = data_lib.make_task(c.task) if c.task.source == "synthetic" else None
  policy, params = build_policy(c, workdir, task)
  shard = distributed.process_shard(c.rollout.prompts_per_step, sharding.batch_sharding(mesh))
  source = data_lib.make_source(c.task, seed=c.seed, task=task, tokenizer=policy.tokenizer,
                                shard_index=shard[0], num_shards=shard[1])
  eval_examples = data_lib.make_eval_examples(c, task=task, tokenizer=policy.tokenizer)
  reward_fn = rewards_lib.get_reward_fn(
      c.reward.name, task=task, num_workers=c.reward.num_workers, timeout_s=c.reward.timeout_s,
      format_coef=c.reward.format_coef, max_response_len=c.rollout.max_new_tokens,
      overlong_buffer=c.reward.overlong_buffer, overlong_penalty=c.reward.overlong_penalty)

  updates_per_step = c.rl.num_minibatches * c.rl.ppo_epochs
  schedule = step_lib.lr_schedule(c.optim, c.num_steps * updates_per_step)
  optimizer = step_lib.make_optimizer(c.optim, c.num_steps * updates_per_step)
  param_shardings = sharding.logical_to_mesh_sharding(
      models.param_logical_axes(policy.model_cfg), mesh, rules, params)
  params = jax.device_put(params, param_shardings)
  ref_params = params if c.loss.kl_ref_coef > 0 else None
  abstract = jax.eval_shape(lambda p: step_lib.TrainState(jnp.zeros((), jnp.int32), p,
                                                          optimizer.init(p)), params)
  shardings = step_lib.state_shardings(abstract, optimizer, mesh, param_shardings)
  state = jax.jit(lambda p: step_lib.TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p)),
                  out_shardings=shardings)(params)
  update_fn = step_lib.make_update(policy.model, policy.model_cfg, c, optimizer, schedule, mesh,
                                   shardings, rules)
  ref_fn = None
  if ref_params is not None:
    ref_fn = jax.jit(lambda p, b: step_lib.logprobs_in_chunks(
        policy.model, policy.model_cfg, p, b, c.rl.num_microbatches * c.rl.num_minibatches,
        c.rollout.temperature, c.rl.fused_chunk_size)[0])

  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 max_to_keep=c.keep_checkpoints)
  carry = {"prev_entropy": None, "nonfinite_streak": 0, "law_points": []}
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(abstract_state=jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings))
    data_states = meta.get("data", {})  # equal on every host (see data/sources.py)
    source.set_state(data_states.get(str(jax.process_index()), data_states.get("0", {})))
    carry.update(meta["carry"])
    log.info("resumed from step %d", int(state.step))
  start = int(state.step)
  writer = metrics.MetricsWriter(workdir, resume_step=start if start else None)
  bar = metrics.ProgressBar(total=c.num_steps, initial=start)
  base_key = jax.random.key(c.seed)
  stop = {"signal": None}
  previous_handlers = _install_signal_handlers(stop)
  rollouts = Rollouts(c, policy, reward_fn, mesh, shard)
  band = jnp.array([c.loss.clip_cov_lb, c.loss.clip_cov_ub], jnp.float32)
  last: dict = {}

  def save(step: int):
    data_states = gather_states(source.get_state())
    ckpt.save(step, state, {"data": data_states, "carry": carry, "seed": c.seed,
                            "config": json.loads(c.to_json_best_effort())})

  try:
    if start == 0 and c.eval_every > 0:  # the starting policy, as step 0
      writer.write(0, evaluate(rollouts, state.params, eval_examples,
                               jax.random.fold_in(base_key, 2**32 - 1), c))  # no step uses it
    for step in range(start, c.num_steps):
      key = jax.random.fold_in(base_key, step)
      roll_key, update_key, eval_key = jax.random.split(key, 3)
      t0, rollouts.reward_seconds = time.perf_counter(), 0.0
      host, every, draws = rollouts.collect(state.params, source, roll_key)
      t1 = time.perf_counter()
      g = c.rollout.num_samples
      adv_PxG = np.asarray(advantages.compute_advantages(
          jnp.asarray(host["rewards"].reshape(-1, g)), c.rl.advantage))
      batch = _build_batch(host, adv_PxG.reshape(-1), mesh)
      if ref_fn is not None:
        batch["ref_logp"] = ref_fn(ref_params, batch)
      t2 = time.perf_counter()
      rollout_stats = token_stats(to_global(host["entropy"], mesh), batch["old_logp"],
                                  batch["advantages"], batch["response_mask"], band)
      state, upd = update_fn(state, batch, update_key)
      upd = jax.device_get(upd)
      t3 = time.perf_counter()

      m = {k: float(v) for k, v in jax.device_get(rollout_stats).items()}
      m.update(_update_metrics(upd))
      m.update(_reward_metrics(every, host, g, c, draws, policy.stop_ids))
      m["entropy/predicted_delta"] = -float(upd["lr"]) * m["cov/mean"]
      if carry["prev_entropy"] is not None:
        m["entropy/actual_delta"] = m["entropy/token_mean"] - carry["prev_entropy"]
      carry["prev_entropy"] = m["entropy/token_mean"]
      n_tokens = float(np.sum(gather(np.array([every["mask"].sum()]))))
      reward_s = rollouts.reward_seconds
      m.update({"time/rollout": t1 - t0 - reward_s, "time/reward": reward_s,
                "time/advantage_batch": t2 - t1, "time/update": t3 - t2,
                "throughput/tokens_per_s": n_tokens / max(t3 - t0, 1e-9)})
      if upd["nonfinite"] > 0:
        carry["nonfinite_streak"] += 1
        log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", step,
                    carry["nonfinite_streak"])
      else:
        carry["nonfinite_streak"] = 0
      done = step + 1
      carry["law_points"].append([m["entropy/token_mean"], m["acc"]])
      if c.eval_every > 0 and (done % c.eval_every == 0 or done == c.num_steps):
        m.update(evaluate(rollouts, state.params, eval_examples, eval_key, c))
        m.update(law_hint(carry["law_points"], done))
      writer.write(done, m)
      bar.update(done, m)
      last = m
      if carry["nonfinite_streak"] >= c.max_nonfinite_steps:
        save(done)
        raise FloatingPointError(
            f"{carry['nonfinite_streak']} non-finite updates in a row (config.max_nonfinite_steps="
            f"{c.max_nonfinite_steps}); the last good state is checkpointed at step {done}")
      if done % c.checkpoint_every == 0 or done == c.num_steps or stop["signal"]:
        save(done)
      if stop["signal"]:
        log.warning("signal %d: checkpointed step %d, stopping", stop["signal"], done)
        break
  finally:
    ckpt.close()
    writer.close()
    reward_fn.close()
    bar.close()
    for s, h in previous_handlers.items():
      signal.signal(s, h)
  if jax.process_index() == 0 and int(state.step) == c.num_steps:
    write_summary(workdir)
  return last


SUMMARY_KEYS = ("reward/mean", "acc", "entropy/token_mean", "entropy/seq_mean", "cov/mean",
                "pg/clipfrac_high", "response/len_mean", "eval/pass@1")


def write_summary(workdir: str) -> None:
  """End of run: PNG plots of reward, accuracy and entropy vs step, and a markdown summary."""
  path = os.path.join(workdir, metrics.METRICS_FILE)
  metrics.plot_metrics(path, ["reward/mean", "acc", "entropy/token_mean"],
                       os.path.join(workdir, "curves.png"))
  records = metrics.read_metrics(path)
  eval_keys = sorted({k for r in records for k in r if k.startswith("eval/")})
  table = metrics.summary_table(records, list(dict.fromkeys(SUMMARY_KEYS + tuple(eval_keys))))
  with open(os.path.join(workdir, "summary.md"), "w") as f:
    f.write(table + "\n")
  print(table)


def law_hint(points, step: int, window: int = 10, min_windows: int = 3) -> dict:
  """The early-stopping hint: EM's law R = -a exp(H) + b fitted on 10-step means of (token
  entropy, rollout accuracy) so far; its ceiling -a + b is the accuracy predicted at H = 0."""
  from entropy_rl import analysis
  h, r = np.asarray(points, np.float64).T if points else (np.zeros(0), np.zeros(0))
  if len(h) < window * min_windows:
    return {}
  try:
    fit = analysis.fit_law(analysis.window_means(h, window), analysis.window_means(r, window))
  except (RuntimeError, ValueError):  # no convergence yet
    return {}
  log.info("step %d: entropy-performance law R = -%.3f exp(H) + %.3f (R^2 %.2f) predicts an "
           "accuracy ceiling of %.3f at H = 0; recent accuracy %.3f", step, fit["a"], fit["b"],
           fit["r2"], fit["ceiling"], float(np.mean(r[-window:])))
  return {"law/a": fit["a"], "law/b": fit["b"], "law/r2": fit["r2"], "law/ceiling": fit["ceiling"]}


def gather_states(state: dict) -> dict:
  """Every host's data position, keyed by process index (hosts read disjoint shards)."""
  if jax.process_count() == 1:
    return {"0": state}
  blob = np.frombuffer(json.dumps(state).encode().ljust(4096), np.uint8)
  rows = multihost_utils.process_allgather(blob[None], tiled=True)
  return {str(i): json.loads(bytes(r).decode().strip()) for i, r in enumerate(np.asarray(rows))}


def _update_metrics(upd: dict) -> dict:
  names = {"clipfrac_low": "pg/clipfrac_low", "clipfrac_high": "pg/clipfrac_high",
           "ppo_kl": "pg/ppo_kl", "pg_loss": "pg/loss", "loss": "loss", "kl_ref": "kl/ref",
           "grad_norm": "grad_norm", "lr": "lr", "nonfinite": "nonfinite",
           "mismatch_logp": "mismatch/sampler_vs_trainer_logp", "abs_dlogp": "pg/abs_dlogp"}
  out = {}
  for k, v in upd.items():
    out[names.get(k, f"select/{k}")] = float(v)
  return out


def _reward_metrics(every: dict, host: dict, g: int, c, draws: int, stop_ids) -> dict:
  """Reward, accuracy, group and length statistics over all hosts."""
  clipped = (host["mask"][:, -1] > 0) & ~np.isin(host["tokens"][:, -1], stop_ids)
  rewards = gather(host["rewards"])
  all_correct = gather(every["correct"])
  lengths = gather(host["mask"].sum(1))
  groups = rewards.reshape(-1, g)
  drawn_groups = gather(every["rewards"]).reshape(-1, g)
  return {
      "reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
      "acc": float(all_correct.mean()),
      "groups/frac_zero_std": float(np.mean(np.ptp(drawn_groups, axis=1) == 0)),
      "groups/kept_frac_zero_std": float(np.mean(np.ptp(groups, axis=1) == 0)),
      "groups/draws": float(draws),
      "response/len_mean": float(lengths.mean()), "response/len_max": float(lengths.max()),
      "response/clip_frac": float(np.mean(gather(clipped))),
  }
