"""Reward functions chosen by name: `get_reward_fn(name, **kw)`.

Every reward function is `fn(examples, responses, *, lengths=None) -> (rewards float32[N], info)`
with `info['correct']` the verifier's 0/1 verdict before shaping, `info['timeouts']` (answers that
overran the time limit, scored 0) and `info['errors']` counts, and a `close()` method. Names:
- 'task': the synthetic task's exact checker (the task named in each example's meta, or `task=`).
- 'math': math-verify in a worker pool, `timeout_s` per answer (kw: num_workers, timeout_s).
- 'format': 1 when the response has a non-empty \\boxed{} answer.
Shaping, added to any of them: `format_coef` times the format reward, and DAPO's overlong
punishment (arXiv 2503.14476, Eq. 13) when `overlong_buffer` > 0: a response of L tokens gets
`clip(((max_response_len - overlong_buffer) - L) / overlong_buffer, -1, 0) * overlong_penalty`,
for which `lengths` (response tokens) is required.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from entropy_rl.data.tasks import TASKS, Example, Task
from entropy_rl.rewards.math import MathReward, format_reward
from entropy_rl.rewards.passk import avg_at_k, mean_pass_at_k, pass_at_k  # noqa: F401

REWARD_NAMES = ("task", "math", "format")


def dapo_overlong_penalty(
    lengths_N, max_response_len: int, overlong_buffer: int, penalty_factor: float = 1.0
) -> np.ndarray:
  """DAPO's soft overlong punishment: 0 up to the expected length, linear to -factor at the max."""
  if not 0 < overlong_buffer <= max_response_len:
    raise ValueError(
        f"overlong_buffer must be in (0, max_response_len={max_response_len}], "
        f"got {overlong_buffer}"
    )
  excess = np.asarray(lengths_N, np.float32) - (max_response_len - overlong_buffer)
  return (np.clip(-excess / overlong_buffer, -1.0, 0.0) * penalty_factor).astype(np.float32)


class TaskReward:
  """The synthetic task's exact checker."""

  def __init__(self, task: Task | None = None):
    self.task = task

  def _task_of(self, example):
    if self.task is not None:
      return self.task
    name = example.meta.get("task")
    if name not in TASKS:
      raise ValueError(f"reward 'task': example meta names no known task ({name!r}); pass task=")
    return TASKS[name]()  # checkers depend only on the example, not on difficulty knobs

  def __call__(self, examples: Sequence[Example], responses: Sequence[str]):
    if len(examples) != len(responses):
      raise ValueError(f"{len(examples)} examples but {len(responses)} responses")
    correct = np.asarray(
        [self._task_of(e).score(e, r) for e, r in zip(examples, responses)], np.float32
    )
    return correct, {"correct": correct, "timeouts": 0, "errors": 0}


class RewardFn:
  """A base reward plus optional format bonus and overlong shaping."""

  def __init__(
      self,
      base,
      *,
      format_coef: float = 0.0,
      max_response_len: int | None = None,
      overlong_buffer: int = 0,
      overlong_penalty: float = 1.0,
  ):
    if overlong_buffer:
      if max_response_len is None:
        raise ValueError("overlong_buffer needs max_response_len")
      dapo_overlong_penalty([0], max_response_len, overlong_buffer)  # validates
    self.base, self.format_coef, self.max_response_len = base, format_coef, max_response_len
    self.overlong_buffer, self.penalty_factor = overlong_buffer, overlong_penalty

  def __call__(self, examples, responses, *, lengths=None):
    rewards, info = self.base(examples, responses)
    rewards = np.asarray(rewards, np.float32)
    if self.format_coef:
      rewards = rewards + self.format_coef * format_reward(examples, responses)[0]
    if self.overlong_buffer:
      if lengths is None or len(lengths) != len(responses):
        raise ValueError("overlong shaping needs `lengths`, one per response")
      penalty = dapo_overlong_penalty(
          lengths, self.max_response_len, self.overlong_buffer, self.penalty_factor
      )
      rewards = rewards + penalty
      info = {**info, "overlong_penalty": penalty}
    return rewards, info

  def close(self):
    if hasattr(self.base, "close"):
      self.base.close()


def get_reward_fn(
    name: str,
    *,
    task: Task | None = None,
    num_workers: int | None = None,
    timeout_s: float = 5.0,
    format_coef: float = 0.0,
    max_response_len: int | None = None,
    overlong_buffer: int = 0,
    overlong_penalty: float = 1.0,
) -> RewardFn:
  """The reward function `name` (one of REWARD_NAMES) with optional shaping (see the module doc)."""
  if name == "task":
    base = TaskReward(task)
  elif name == "math":
    base = MathReward(num_workers=num_workers, timeout_s=timeout_s)
  elif name == "format":
    base = format_reward
  else:
    raise ValueError(f"reward.name must be one of {REWARD_NAMES}, got {name!r}")
  return RewardFn(
      base,
      format_coef=format_coef,
      max_response_len=max_response_len,
      overlong_buffer=overlong_buffer,
      overlong_penalty=overlong_penalty,
  )


def from_config(reward_cfg, task: Task | None, max_response_len: int) -> RewardFn:
  """The run's reward function from `config.reward` (the trainer's responses are at most
  `max_response_len` tokens, the limit DAPO's overlong shaping counts back from)."""
  return get_reward_fn(
      reward_cfg.name,
      task=task,
      num_workers=reward_cfg.num_workers,
      timeout_s=reward_cfg.timeout_s,
      format_coef=reward_cfg.format_coef,
      max_response_len=max_response_len,
      overlong_buffer=reward_cfg.overlong_buffer,
      overlong_penalty=reward_cfg.overlong_penalty,
  )
