"""Rewards: math-verify in a time-bounded pool, format, DAPO overlong shaping, task rewards, pass@k."""

import itertools
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from entropy_rl import rewards
from entropy_rl.data import tasks as tasks_lib
from entropy_rl.data.sources import answer_text
from entropy_rl.data.tasks import Example
from entropy_rl.data.extract import extract_boxed, gsm8k_answer
from entropy_rl.rewards.pool import TimeoutPool

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "math500.jsonl").exists(), reason="no ../shared/data")
TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def math_fn():
  fn = rewards.get_reward_fn("math", num_workers=2, timeout_s=TIMEOUT_S)
  yield fn
  fn.close()


def _ex(answer):
  return Example("q", answer)


def test_math_equivalent_forms(math_fn):
  cases = [
      ("\\frac{1}{2}", "So the answer is \\boxed{0.5}.", 1),
      ("0.5", "$\\boxed{\\frac{1}{2}}$", 1),
      ("\\frac{1}{2}", "\\boxed{1/2}", 1),
      ("\\frac{1}{2}", "\\boxed{\\dfrac12}", 1),
      ("1/2", "The answer is 0.5", 1),
      ("\\frac{1}{2}", "\\boxed{0.51}", 0),
      ("\\frac{1}{2}", "\\boxed{2}", 0),
      ("3\\sqrt{2}", "\\boxed{\\sqrt{18}}", 1),
      ("(1,2)", "\\boxed{(1, 2)}", 1),
      ("(1,2)", "\\boxed{(2,1)}", 0),
      ("18", "Janet makes \\boxed{\\$18}", 1),
      ("x^2+1", "\\boxed{1+x^2}", 1),
      ("5", "I don't know", 0),
      ("5", "", 0),
      # The last box is the answer; earlier ones are drafts (not the set {1, 5}).
      ("5", "first \\boxed{1}, then \\boxed{5}", 1),
      ("1", "\\boxed{1} \\boxed{5}", 0),
  ]
  got, info = math_fn([_ex(g) for g, _, _ in cases], [r for _, r, _ in cases])
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, [w for _, _, w in cases])
  np.testing.assert_array_equal(info["correct"], got)
  assert info["timeouts"] == 0 and info["errors"] == 0


def test_math_pool_survives_a_hanging_answer(math_fn):
  # Without a time limit this comparison runs for minutes (sympy evaluating a power tower).
  responses = ["\\boxed{5}", "\\boxed{9^{9^{9^{9}}}}", "\\boxed{6}", "\\boxed{5}"]
  start = time.monotonic()
  got, info = math_fn([_ex("5")] * 4, responses)
  assert time.monotonic() - start < TIMEOUT_S + 15
  np.testing.assert_array_equal(got, [1, 0, 0, 1])
  assert info["timeouts"] == 1
  got, info = math_fn([_ex("5")], ["\\boxed{5}"])  # the replaced worker serves the next call
  assert got[0] == 1 and info["timeouts"] == 0


def test_timeout_pool_counts_timeouts_failures_and_deaths():
  pool = TimeoutPool(time.sleep, num_workers=2, timeout_s=1.0, default=-1)
  try:
    results, timed_out, failed = pool.map([(0.01,), (60,), ("x",), (0.01,)])
    assert results == [None, -1, -1, None]
    np.testing.assert_array_equal(timed_out, [0, 1, 0, 0])
    np.testing.assert_array_equal(failed, [0, 0, 1, 0])
    assert len(pool.errors) == 1 and "TypeError" in pool.errors[0]
  finally:
    pool.close()
  pool = TimeoutPool(os._exit, num_workers=1, timeout_s=10.0)
  try:
    results, timed_out, failed = pool.map([(3,), (4,)])
    assert results == [0.0, 0.0] and failed.all() and not timed_out.any()
  finally:
    pool.close()
  with pytest.raises(ValueError, match="module-level"):
    TimeoutPool(lambda: 0, num_workers=1, timeout_s=1.0)


@needs_data
def test_math500_gold_solutions_verify(math_fn):
  rows = [json.loads(line) for line in (DATA / "math500.jsonl").read_text().splitlines()]
  golds = [_ex(r["answer"]) for r in rows]
  own, info = math_fn(golds, [r["solution"] for r in rows])
  assert info["timeouts"] == 0
  assert own.mean() >= 0.995, [r["answer"] for r, s in zip(rows, own) if not s]
  # Against another problem's answer: 0, except where the two gold answers are themselves equal.
  shifted = [golds[(i + 7) % len(rows)] for i in range(len(rows))]
  cross, _ = math_fn(shifted, [r["solution"] for r in rows])
  accepted = np.flatnonzero(cross)
  same, _ = math_fn(
      [shifted[i] for i in accepted], [f"\\boxed{{{rows[i]['answer']}}}" for i in accepted]
  )
  assert same.all(), [(rows[i]["answer"], shifted[i].answer) for i in accepted]
  assert len(accepted) <= 5
  print(f"MATH-500: own {int(own.sum())}/500, cross accepted {len(accepted)}/500")


@needs_data
def test_gsm8k_answers_parse_and_verify(math_fn):
  rows = [json.loads(line) for line in (DATA / "gsm8k_test.jsonl").read_text().splitlines()]
  answers = [gsm8k_answer(r["answer"]) for r in rows]
  assert all(a is not None and np.isfinite(float(a)) for a in answers)
  sample = answers[::10]
  got, _ = math_fn([_ex(a) for a in sample], [f"The answer is $\\boxed{{{a}}}$." for a in sample])
  assert got.all()


def test_extraction():
  assert extract_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}} end") == "\\frac{1}{2}"
  assert extract_boxed("\\fbox{x^{2}}") == "x^{2}"
  assert extract_boxed("so \\boxed 7.") == "7."
  assert extract_boxed("\\boxed{unclosed") is None and extract_boxed("none") is None
  assert gsm8k_answer("blah\n#### 1,234") == "1234" and gsm8k_answer("no marker") is None
  assert answer_text(27.0) == "27" and answer_text(["$x=3$", "$4$"]) == "$x=3$, $4$"


def test_format_reward():
  fn = rewards.get_reward_fn("format")
  got, info = fn([_ex("1")] * 4, ["\\boxed{3}", "3", "\\boxed{}", "\\boxed{ }"])
  np.testing.assert_array_equal(got, [1, 0, 0, 0])
  assert info["timeouts"] == 0


def test_task_reward():
  task = tasks_lib.get_task("arithmetic")
  rng = np.random.default_rng(0)
  examples = [task.example(0, i, "train") for i in range(6)]
  responses = [task.demonstration(e, rng, float(i % 2)) for i, e in enumerate(examples)]
  got, info = rewards.get_reward_fn("task", task=task)(examples, responses)
  np.testing.assert_array_equal(got, [1, 0, 1, 0, 1, 0])
  np.testing.assert_array_equal(info["correct"], got)
  # Without task=, each example's meta names its task family.
  mixed = examples[:2] + [tasks_lib.get_task("countdown").example(0, 0, "train")]
  answers = responses[:2] + [tasks_lib.get_task("countdown").demonstration(mixed[2], rng, 0.0)]
  got, _ = rewards.get_reward_fn("task")(mixed, answers)
  np.testing.assert_array_equal(got, [1, 0, 1])
  with pytest.raises(ValueError, match="task="):
    rewards.get_reward_fn("task")([Example("q", "1")], ["1"])
  with pytest.raises(ValueError, match="reward.name"):
    rewards.get_reward_fn("bleu")


def test_dapo_overlong_shaping():
  # DAPO Eq. 13 with L_max = 20, L_cache = 4: 0 up to 16 tokens, linear to -1 at 20, -1 beyond.
  lengths = np.array([0, 16, 17, 18, 20, 25])
  want = np.array([0.0, 0.0, -0.25, -0.5, -1.0, -1.0])
  np.testing.assert_allclose(rewards.dapo_overlong_penalty(lengths, 20, 4), want)
  np.testing.assert_allclose(rewards.dapo_overlong_penalty(lengths, 20, 4, 0.5), want * 0.5)
  task = tasks_lib.get_task("arithmetic")
  e = task.example(0, 0, "train")
  right = task.demonstration(e, np.random.default_rng(0), 0.0)
  fn = rewards.get_reward_fn("task", max_response_len=20, overlong_buffer=4, overlong_penalty=1.0)
  got, info = fn([e] * 3, [right, right, "0"], lengths=[10, 18, 20])
  np.testing.assert_allclose(got, [1.0, 0.5, -1.0])
  np.testing.assert_array_equal(info["correct"], [1, 1, 0])
  np.testing.assert_allclose(info["overlong_penalty"], [0, -0.5, -1])
  with pytest.raises(ValueError, match="lengths"):
    fn([e], [right])
  with pytest.raises(ValueError, match="max_response_len"):
    rewards.get_reward_fn("format", overlong_buffer=4)
  with pytest.raises(ValueError, match="overlong_buffer"):
    rewards.get_reward_fn("format", max_response_len=4, overlong_buffer=8)


def test_format_coef_adds_the_format_reward():
  fn = rewards.get_reward_fn("task", format_coef=0.1)
  e = Example("1+2=", "3", {"task": "arithmetic"})
  got, info = fn([e] * 3, ["3", "\\boxed{3}", "\\boxed{4}"])
  np.testing.assert_allclose(got, [1.0, 0.1, 0.1])
  np.testing.assert_array_equal(info["correct"], [1, 0, 0])


def _brute_pass_at_k(row, k):
  """Probability that a uniformly random k-subset of the samples holds a correct one."""
  subsets = list(itertools.combinations(range(len(row)), k))
  return np.mean([any(row[i] for i in s) for s in subsets])


def test_pass_at_k_is_unbiased():
  rng = np.random.default_rng(0)
  correct = rng.random((12, 8)) < rng.random((12, 1))
  correct[0], correct[1] = False, True
  for k in (1, 2, 3, 5, 8):
    want = np.mean([_brute_pass_at_k(r, k) for r in correct])
    assert rewards.mean_pass_at_k(correct, k) == pytest.approx(want, abs=1e-12)
    for row in correct[:4]:
      assert rewards.pass_at_k(8, int(row.sum()), k) == pytest.approx(_brute_pass_at_k(row, k))
  assert rewards.pass_at_k(16, 4, 1) == pytest.approx(0.25)
  assert rewards.mean_pass_at_k(correct, 1) == pytest.approx(correct.mean())
  assert rewards.avg_at_k(correct) == pytest.approx(correct.mean())
  with pytest.raises(ValueError, match="k=9"):
    rewards.mean_pass_at_k(correct, 9)
  with pytest.raises(ValueError, match="c=9"):
    rewards.pass_at_k(8, 9, 1)
