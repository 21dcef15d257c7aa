"""Math answer rewards through math-verify, time-bounded in a worker pool.

The response's answer is the content of its last \\boxed{} (earlier boxes are drafts: `\\boxed{1}
... \\boxed{5}` answers 5), or, without a box, what math-verify extracts from the whole text
(other LaTeX and plain expressions). It is compared with the gold answer (wrapped in \\boxed{})
by LaTeX, symbolic and numeric equivalence, so 0.5, 1/2 and \\frac{1}{2} all match. math-verify's own signal-based
timeouts are off: the pool kills a worker that overruns, which also stops computations that a
signal cannot interrupt; such an answer scores 0 and is counted in `info['timeouts']`.
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import numpy as np

from entropy_rl.data.tasks import Example
from entropy_rl.data.extract import extract_boxed
from entropy_rl.rewards.pool import TimeoutPool


@functools.lru_cache(maxsize=1024)
def _parse_gold(gold: str):
  import math_verify  # pylint: disable=g-import-not-at-top

  text = gold if "\\boxed" in gold else "\\boxed{" + gold + "}"
  return math_verify.parse(text, parsing_timeout=None)


def verify_answer(gold: str, response: str) -> float:
  """1.0 iff math-verify finds the response's final answer equivalent to `gold` (no time limit)."""
  import logging  # pylint: disable=g-import-not-at-top
  import math_verify  # pylint: disable=g-import-not-at-top

  logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled" warnings
  gold_parsed = _parse_gold(gold)
  boxed = extract_boxed(response)
  text = response if boxed is None else "\\boxed{" + boxed + "}"
  answer = math_verify.parse(text, parsing_timeout=None)
  if not gold_parsed or not answer:
    return 0.0
  return float(math_verify.verify(gold_parsed, answer, timeout_seconds=None))


class MathReward:
  """`fn(examples, responses) -> (rewards, info)` with math-verify in `num_workers` processes and a
  `timeout_s` limit per answer. The pool starts on first use; `close()` stops it."""

  def __init__(self, *, num_workers: int | None = None, timeout_s: float = 5.0):
    self.num_workers = num_workers or min(4, os.cpu_count() or 1)
    self.timeout_s = timeout_s
    self._pool = None

  def __call__(self, examples: Sequence[Example], responses: Sequence[str]):
    if len(examples) != len(responses):
      raise ValueError(f"{len(examples)} examples but {len(responses)} responses")
    if self._pool is None:
      self._pool = TimeoutPool(
          verify_answer, num_workers=self.num_workers, timeout_s=self.timeout_s, default=0.0
      )
    scores, timed_out, failed = self._pool.map(
        [(ex.answer, r) for ex, r in zip(examples, responses)]
    )
    correct = np.asarray(scores, np.float32)
    return correct, {
        "correct": correct,
        "timeouts": int(timed_out.sum()),
        "errors": int(failed.sum()),
        "error_messages": self._pool.errors[:3],
    }

  def close(self):
    if self._pool is not None:
      self._pool.close()
      self._pool = None


def format_reward(examples: Sequence[Example], responses: Sequence[str]):
  """1.0 where the response puts a non-empty final answer in \\boxed{}."""
  del examples
  ok = np.asarray([bool((extract_boxed(r) or "").strip()) for r in responses], np.float32)
  return ok, {"correct": ok, "timeouts": 0, "errors": 0}
