"""Rollouts and evaluation: prompts in; response tokens, masks, behaviour log-probs, entropies and
rewards out.

`Rollouts.generate` is the one place that samples (through `sampling.sample`) and scores; an
inference-engine backend would replace it. `collect` draws one RL step's batch (with DAPO's
dynamic sampling), `evaluate` the benchmark metrics. Every host feeds its own block of rows.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import flax.linen as nn
import jax
import numpy as np

from entropy_rl import config_lib, sampling, sharding
from entropy_rl import data as data_lib
from entropy_rl import rewards as rewards_lib
from entropy_rl.distributed import gather, to_global, to_local

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Rollout:
  """N = prompts x samples responses of this host, as NumPy arrays ([N, P] prompt, [N, L] rest)."""

  prompt: np.ndarray
  prompt_mask: np.ndarray
  tokens: np.ndarray
  mask: np.ndarray  # float32, 1 on response tokens (EOS included)
  logp: np.ndarray  # the sampler's log-probs of the taken tokens
  entropy: np.ndarray
  rewards: np.ndarray  # shaped rewards, float32 [N]
  correct: np.ndarray  # the verifier's 0/1 verdict, float32 [N]

  def rows(self, start: int, stop: int) -> "Rollout":
    return Rollout(**{f.name: getattr(self, f.name)[start:stop] for f in dataclasses.fields(self)})

  def trimmed(self, bucket: int) -> "Rollout":
    """The same rows without the padding all of them share: the prompt columns left of the longest
    prompt and the response columns right of the longest response, rounded up to multiples of
    `bucket` tokens (0: unchanged) so the update meets few shapes. Lengths are maxed over hosts,
    so every host trims alike. Positions, masks and every loss denominator are unchanged."""
    if bucket <= 0:
      return self
    local = [self.prompt_mask.sum(1).max(initial=0), (self.mask > 0).sum(1).max(initial=0)]
    p_len, r_len = gather(np.asarray(local, np.int64)).reshape(-1, 2).max(0)
    up = lambda n, limit: int(min(limit, max(bucket, -(-int(n) // bucket) * bucket)))
    p, r = up(p_len, self.prompt.shape[1]), up(r_len, self.tokens.shape[1])
    return dataclasses.replace(
        self,
        prompt=self.prompt[:, self.prompt.shape[1] - p :],
        prompt_mask=self.prompt_mask[:, self.prompt.shape[1] - p :],
        tokens=self.tokens[:, :r],
        mask=self.mask[:, :r],
        logp=self.logp[:, :r],
        entropy=self.entropy[:, :r],
    )

  @staticmethod
  def concat(parts) -> "Rollout":
    return Rollout(
        **{
            f.name: np.concatenate([getattr(p, f.name) for p in parts])
            for f in dataclasses.fields(Rollout)
        }
    )


@dataclasses.dataclass
class RewardCounts:
  """Reward-function faults since the last `reset()`: answers that timed out or raised."""

  timeouts: int = 0
  errors: int = 0
  seconds: float = 0.0


class Rollouts:
  """Sampling and scoring G responses per prompt with the current parameters."""

  def __init__(
      self,
      config: config_lib.RolloutConfig,
      policy,
      reward_fn,
      mesh,
      shard: tuple[int, int] = (0, 1),
  ):
    self.config, self.policy, self.reward_fn, self.mesh = config, policy, reward_fn, mesh
    # This host feeds block shard[0] of shard[1] equal row blocks of every global prompt batch.
    self.shard_index, self.num_shards = shard
    self.faults = RewardCounts()

  def generate(
      self,
      params,
      examples,
      key,
      *,
      num_samples,
      temperature,
      max_new_tokens,
      greedy=False,
      max_rows_in_flight=None,
  ) -> Rollout:
    """Samples and scores `num_samples` responses per example, `max_rows_in_flight` rows at a
    time (default: `config.max_rows_in_flight`; 0 = all)."""
    c, pol = self.config, self.policy
    if max_rows_in_flight is None:
      max_rows_in_flight = c.max_rows_in_flight
    prompt_BxP, pmask_BxP = data_lib.encode_prompts(
        pol.tokenizer, [ex.prompt for ex in examples], c.max_prompt_len
    )
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.default_rules()):
      out = sampling.sample(
          pol.model,
          params,
          to_global(prompt_BxP, self.mesh),
          to_global(pmask_BxP, self.mesh),
          key,
          num_samples=num_samples,
          max_new_tokens=max_new_tokens,
          temperature=temperature,
          top_p=c.top_p,
          top_k=c.top_k,
          greedy=greedy,
          stop_ids=pol.stop_ids,
          pad_id=pol.pad_id,
          return_entropy=True,
          max_rows_in_flight=max_rows_in_flight,
          prefill_chunks=c.prefill_chunks,
      )
    tokens, mask = to_local(out.tokens_NxL), to_local(out.mask_NxL)
    texts = data_lib.decode_responses(pol.tokenizer, tokens, mask)
    repeated = [ex for ex in examples for _ in range(num_samples)]
    t0 = time.perf_counter()
    rewards, info = self.reward_fn(repeated, texts, lengths=mask.sum(1))
    self.faults.seconds += time.perf_counter() - t0
    self._report_faults(info)
    return Rollout(
        prompt=to_local(out.prompt_NxP),
        prompt_mask=to_local(out.prompt_mask_NxP),
        tokens=tokens,
        mask=mask.astype(np.float32),
        logp=to_local(out.logprobs_NxL),
        entropy=to_local(out.entropy_NxL),
        rewards=np.asarray(rewards, np.float32),
        correct=np.asarray(info.get("correct", rewards), np.float32),
    )

  def _report_faults(self, info) -> None:
    timeouts, errors = int(info.get("timeouts", 0)), int(info.get("errors", 0))
    self.faults.timeouts += timeouts
    self.faults.errors += errors
    if timeouts:
      log.warning(
          "%d answers took longer than config.reward.timeout_s=%g s to verify and scored " "0",
          timeouts,
          self.config.reward_timeout_s,
      )
    if errors:
      first = (info.get("error_messages") or ["(no message)"])[0]
      log.warning(
          "the reward function failed on %d answers, which scored 0; first error: %s", errors, first
      )

  def collect(self, params, source, key, check_stop=None) -> tuple[Rollout, Rollout, int]:
    """One step's rollout (this host's rows), every response drawn, and the number of draws.

    With dynamic sampling (DAPO), groups whose `config.filter_groups_metric` (accuracy by
    default, as DAPO's `filter_groups.metric: acc`) is the same for every response are replaced
    by groups from further draws, up to `dynamic_sampling_max_draws`. `check_stop()` runs before
    every draw after the first.
    """
    c = self.config
    b = c.prompts_per_step // self.num_shards
    g = c.num_samples
    draws, kept, spare, drawn = 0, [], [], []
    while True:
      if draws and check_stop is not None:
        check_stop()
      examples = source.next_batch(b)
      out = self.generate(
          params,
          examples,
          jax.random.fold_in(key, draws),
          num_samples=g,
          temperature=c.temperature,
          max_new_tokens=c.max_new_tokens,
      )
      draws += 1
      drawn.append(out)
      metric_N = out.correct if c.filter_groups_metric == "acc" else out.rewards
      for i in range(b):
        informative = np.ptp(metric_N[i * g : (i + 1) * g]) > 0
        (kept if informative or not c.dynamic_sampling else spare).append(
            out.rows(i * g, (i + 1) * g)
        )
      if not c.dynamic_sampling:
        break
      enough = int(np.min(gather(np.array([len(kept) >= b], np.int32))))
      if enough or draws >= c.dynamic_sampling_max_draws:
        break
    return Rollout.concat((kept + spare)[:b]), Rollout.concat(drawn), draws


def evaluate(
    rollouts: Rollouts, params, eval_examples, key, c: config_lib.RunConfig, check_stop=None
) -> dict:
  """eval/pass@1 (greedy), eval/avg@k and unbiased eval/pass@k over k samples, eval/entropy, at
  `eval.temperature`; eval/T<t>/avg@k and eval/T<t>/pass@k at each of `eval.extra_temperatures`.

  `eval_examples` is the whole list on every host, evaluated in global chunks of
  `prompts_per_step` prompts (the last one padded) of which each host feeds its block of rows,
  with at most `eval_rows_in_flight(c)` rows sampled at once.
  """
  k = c.eval.num_samples
  rows = eval_rows_in_flight(c)
  max_new = c.eval.max_new_tokens if c.eval.max_new_tokens > 0 else c.rollout.max_new_tokens
  chunk_size = c.rollout.prompts_per_step
  b = chunk_size // rollouts.num_shards
  temps = (c.eval.temperature,) + c.eval.extra_temperatures
  greedy, valid, ent_sum, tok = [], [], 0.0, 0.0
  correct = [[] for _ in temps]
  for start in range(0, len(eval_examples), chunk_size):
    if check_stop is not None:
      check_stop()
    first = start + rollouts.shard_index * b
    chunk = list(eval_examples[first : first + b])
    n = len(chunk)
    chunk += [eval_examples[0]] * (b - n)  # static shapes; padded prompts are dropped below
    key, k1, *k2 = jax.random.split(key, 2 + len(temps))
    g = rollouts.generate(
        params,
        chunk,
        k1,
        num_samples=1,
        temperature=1.0,
        max_new_tokens=max_new,
        greedy=True,
        max_rows_in_flight=rows,
    )
    for i, temp in enumerate(temps):
      s = rollouts.generate(
          params,
          chunk,
          k2[i],
          num_samples=k,
          temperature=temp,
          max_new_tokens=max_new,
          max_rows_in_flight=rows,
      )
      correct[i].append(s.correct.reshape(b, k))
      if i == 0:
        ent_sum += float(np.sum(s.entropy[: n * k] * s.mask[: n * k]))
        tok += float(np.sum(s.mask[: n * k]))
    greedy.append(g.correct)
    valid.append(np.arange(b) < n)
  valid = gather(np.concatenate(valid))  # every host gathers arrays of one shape
  greedy = gather(np.concatenate(greedy))[valid]
  ent = gather(np.array([ent_sum, tok])).reshape(-1, 2).sum(0)
  out = {"eval/pass@1": float(np.mean(greedy)), "eval/entropy": float(ent[0] / max(ent[1], 1.0))}
  for i, temp in enumerate(temps):
    ok = gather(np.concatenate(correct[i]))[valid]
    prefix = "eval/" if i == 0 else f"eval/T{temp:g}/"
    out[f"{prefix}avg@{k}"] = float(np.mean(ok))
    out[f"{prefix}pass@{k}"] = rewards_lib.mean_pass_at_k(ok, k)
  return out


def eval_rows_in_flight(c: config_lib.RunConfig) -> int:
  """Global rows an evaluation samples at once: `config.eval.max_rows_in_flight`, where -1 means
  as many as a training rollout holds (so evaluation never needs more KV memory) and 0 all."""
  if c.eval.max_rows_in_flight >= 0:
    return c.eval.max_rows_in_flight
  return c.rollout.max_rows_in_flight or c.rollout.prompts_per_step * c.rollout.num_samples


def reward_metrics(every: Rollout, kept: Rollout, g: int, draws: int, stop_ids) -> dict:
  """Reward, accuracy, group and length statistics over all hosts."""
  clipped = (kept.mask[:, -1] > 0) & ~np.isin(kept.tokens[:, -1], stop_ids)
  rewards = gather(kept.rewards)
  lengths = gather(kept.mask.sum(1))
  drawn_groups = gather(every.rewards).reshape(-1, g)
  return {
      "reward/mean": float(rewards.mean()),
      "reward/std": float(rewards.std()),
      "acc": float(gather(every.correct).mean()),
      "groups/frac_zero_std": float(np.mean(np.ptp(drawn_groups, axis=1) == 0)),
      "groups/kept_frac_zero_std": float(np.mean(np.ptp(rewards.reshape(-1, g), axis=1) == 0)),
      "groups/draws": float(draws),
      "response/len_mean": float(lengths.mean()),
      "response/len_max": float(lengths.max()),
      "response/clip_frac": float(np.mean(gather(clipped))),
  }
