"""Seeded synthetic tasks with exact checkers: the embedded default that needs no downloads.

Each task family generates short problems in a small character alphabet (prompt <= 24 characters,
response <= 32), checks a response exactly (`score` -> 0 or 1), and writes demonstrations that are
sometimes wrong (`demonstration(..., corrupt_prob)`) for the supervised warm start, so the starting
policy behaves like a base model: often wrong, sometimes right, and diverse.

Train and eval splits are disjoint by construction: a problem belongs to the eval split iff a stable
hash of its prompt falls below `eval_fraction`.
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
import hashlib
import itertools
import re
from typing import Any, Mapping

import numpy as np

SPLITS = ("train", "eval")


@dataclasses.dataclass(frozen=True)
class Example:
  """One prompt with its reference answer; `meta` holds task- or source-specific fields."""

  prompt: str
  answer: str
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def split_of(prompt: str, eval_fraction: float) -> str:
  """'eval' iff the stable hash of the prompt falls in the first `eval_fraction` of [0, 1)."""
  digest = hashlib.blake2b(prompt.encode(), digest_size=8).digest()
  u = int.from_bytes(digest, "little") / 2.0**64
  return "eval" if u < eval_fraction else "train"


@dataclasses.dataclass(frozen=True)
class Task:
  """A family of generated problems. Subclasses define `alphabet`, `_generate`, `demonstration`, `score`."""

  eval_fraction: float = 0.1

  name = "task"
  alphabet = ""

  def __post_init__(self):
    if not 0.0 < self.eval_fraction < 1.0:
      raise ValueError(f"{self.name}.eval_fraction must be in (0, 1), got {self.eval_fraction}")

  def _generate(self, rng: np.random.Generator) -> Example:
    raise NotImplementedError

  def demonstration(self, example: Example, rng: np.random.Generator, corrupt_prob: float) -> str:
    """A response to `example` (without EOS); wrong with probability `corrupt_prob`."""
    raise NotImplementedError

  def score(self, example: Example, response: str) -> float:
    """1.0 iff `response` (decoded, EOS stripped) is a correct answer, else 0.0."""
    raise NotImplementedError

  def example(self, seed: int, index: int, split: str) -> Example:
    """The `index`-th problem of `split` for `seed`: a pure function of its arguments."""
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng([seed, index, SPLITS.index(split)])
    while True:
      ex = self._generate(rng)
      if split_of(ex.prompt, self.eval_fraction) == split:
        return ex

  def eval_examples(self, n: int, seed: int = 0) -> list[Example]:
    """`n` distinct eval-split problems, the same for the same seed."""
    out, seen, index = [], set(), 0
    while len(out) < n:
      ex = self.example(seed, index, "eval")
      index += 1
      if ex.prompt not in seen:
        seen.add(ex.prompt)
        out.append(ex)
      if index > 100 * n + 1000:
        raise ValueError(f"{self.name}: fewer than {n} distinct eval problems; widen the task")
    return out


_CHAIN_RE = re.compile(r"-?\d+(;-?\d+)*")


@dataclasses.dataclass(frozen=True)
class ArithmeticChain(Task):
  """`a+b-c+d=` answered by the running results, `s1;s2;s3`; the last one is the answer.

  Difficulty knobs: `num_terms` operands drawn uniformly from [0, `max_value`]. Corrupted
  demonstrations perturb one step (an intermediate or the final) and carry the error forward.
  """

  num_terms: int = 4
  max_value: int = 99

  name = "arithmetic"
  alphabet = "0123456789+-;="

  def __post_init__(self):
    super().__post_init__()
    if self.num_terms < 2:
      raise ValueError(f"arithmetic.num_terms must be >= 2, got {self.num_terms}")
    if self.max_value < 1:
      raise ValueError(f"arithmetic.max_value must be >= 1, got {self.max_value}")

  def _generate(self, rng):
    values = rng.integers(0, self.max_value + 1, size=self.num_terms).tolist()
    signs = rng.choice(["+", "-"], size=self.num_terms - 1).tolist()
    prompt = str(values[0]) + "".join(s + str(v) for s, v in zip(signs, values[1:])) + "="
    steps = _running(values, signs)
    return Example(prompt, str(steps[-1]), {"task": self.name, "values": values, "signs": signs})

  def demonstration(self, example, rng, corrupt_prob):
    values, signs = list(example.meta["values"]), example.meta["signs"]
    if rng.random() >= corrupt_prob:
      return ";".join(map(str, _running(values, signs)))
    steps = []
    wrong = int(rng.integers(len(signs)))
    acc = values[0]
    for i, (s, v) in enumerate(zip(signs, values[1:])):
      acc = acc + v if s == "+" else acc - v
      if i == wrong:
        acc += int(rng.choice([-1, 1])) * int(rng.integers(1, 11))
      steps.append(acc)
    return ";".join(map(str, steps))

  def score(self, example, response):
    if not _CHAIN_RE.fullmatch(response):
      return 0.0
    return float(int(response.rsplit(";", 1)[-1]) == int(example.answer))


def _running(values, signs):
  acc, steps = values[0], []
  for s, v in zip(signs, values[1:]):
    acc = acc + v if s == "+" else acc - v
    steps.append(acc)
  return steps


_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


@dataclasses.dataclass(frozen=True)
class Countdown(Task):
  """`3,7,9:20=` answered by an expression that uses each number exactly once, e.g. `3*9-7`.

  Many answers are correct, so exploration matters. Difficulty knobs: `num_numbers` drawn from
  [1, `max_number`], operators `ops`, targets in [1, `max_target`] (always reachable). Corrupted
  demonstrations are well-formed expressions over the same numbers that miss the target.
  """

  num_numbers: int = 3
  max_number: int = 12
  max_target: int = 99
  ops: str = "+-*"

  name = "countdown"
  alphabet = "0123456789+-*/(),:="

  def __post_init__(self):
    super().__post_init__()
    if not 2 <= self.num_numbers <= 4:
      raise ValueError(f"countdown.num_numbers must be in [2, 4], got {self.num_numbers}")
    if not self.ops or set(self.ops) - set(_PRECEDENCE):
      raise ValueError(f"countdown.ops must be a non-empty subset of '+-*/', got {self.ops!r}")

  def _generate(self, rng):
    for _ in range(1000):
      numbers = tuple(sorted(rng.integers(1, self.max_number + 1, size=self.num_numbers).tolist()))
      values = _expressions(numbers, self.ops)
      reachable = sorted(v for v in values if v.denominator == 1 and 1 <= v <= self.max_target)
      if reachable:
        target = int(reachable[int(rng.integers(len(reachable)))])
        prompt = ",".join(map(str, numbers)) + f":{target}="
        return Example(
            prompt, str(target), {"task": self.name, "numbers": numbers, "target": target}
        )
    raise ValueError(
        f"countdown: no target in [1, max_target={self.max_target}] is reachable; " "widen the task"
    )

  def demonstration(self, example, rng, corrupt_prob):
    values = _expressions(tuple(example.meta["numbers"]), self.ops)
    target = fractions.Fraction(example.meta["target"])
    wrong = rng.random() < corrupt_prob and len(values) > 1
    pool = sorted(e for v, exprs in values.items() if (v != target) == wrong for e in exprs)
    return pool[int(rng.integers(len(pool)))]

  def score(self, example, response):
    value, used = _evaluate(response)
    if value is None or sorted(used) != sorted(example.meta["numbers"]):
      return 0.0
    return float(value == example.meta["target"])


@functools.lru_cache(maxsize=4096)
def _expressions(numbers: tuple[int, ...], ops: str) -> dict[fractions.Fraction, tuple[str, ...]]:
  """Every value reachable using each number once, with the distinct expressions that reach it."""
  out: dict[fractions.Fraction, set[str]] = {}
  for perm in set(itertools.permutations(numbers)):
    for value, text, _ in _trees(perm, ops):
      out.setdefault(value, set()).add(text)
  return {v: tuple(sorted(t)) for v, t in out.items()}


@functools.lru_cache(maxsize=65536)
def _trees(nums: tuple[int, ...], ops: str) -> tuple[tuple[fractions.Fraction, str, int], ...]:
  """(value, minimal-parenthesis text, precedence) of every binary tree over `nums` in order."""
  if len(nums) == 1:
    return ((fractions.Fraction(nums[0]), str(nums[0]), 3),)
  out = []
  for k in range(1, len(nums)):
    for lv, lt, lp in _trees(nums[:k], ops):
      for rv, rt, rp in _trees(nums[k:], ops):
        for op in ops:
          if op == "/" and rv == 0:
            continue
          p = _PRECEDENCE[op]
          left = f"({lt})" if lp < p else lt
          right = f"({rt})" if rp < p or (rp == p and op in "-/") else rt
          out.append((_apply(op, lv, rv), left + op + right, p))
  return tuple(out)


def _apply(op, a, b):
  return a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a / b


_STEP_RE = re.compile(r"(\d+)([-+*/])(\d+)=(\d+)")


@dataclasses.dataclass(frozen=True)
class CountdownSteps(Task):
  """`3,7,9:20=` answered by worked steps that use each number once, e.g. `9*3=27;27-7=20`.

  Each step `a op b=c` combines two numbers of the pool (the given numbers, then the results) into
  c, an integer in [1, `max_result`]; after `num_numbers - 1` steps the one number left must be the
  target. Once the operands and the operator are written the rest of a step is determined, so only
  the choice tokens fork (HE-like entropy). Demonstrations write the larger operand first; the
  checker accepts either order. Difficulty knobs: `num_numbers` drawn from [1, `max_number`],
  operators `ops`, targets drawn uniformly from the reachable values in [1, `max_target`].
  The defaults give about 13k problems (1.3k in the eval split): a finite pool that RL revisits.
  Corrupted demonstrations are valid worked steps over the same numbers that end off the target.
  """

  num_numbers: int = 3
  max_number: int = 20
  max_target: int = 99
  max_result: int = 99
  ops: str = "+-*"

  name = "countdown_steps"
  alphabet = "0123456789+-*/,:;="

  def __post_init__(self):
    super().__post_init__()
    if not 2 <= self.num_numbers <= 5:
      raise ValueError(f"countdown_steps.num_numbers must be in [2, 5], got {self.num_numbers}")
    if not self.ops or set(self.ops) - set(_PRECEDENCE):
      raise ValueError(
          f"countdown_steps.ops must be a non-empty subset of '+-*/', got {self.ops!r}"
      )
    if self.max_result < max(self.max_number, self.max_target):
      raise ValueError(
          f"countdown_steps.max_result must be >= max_number and max_target, got "
          f"{self.max_result}"
      )

  def _generate(self, rng):
    for _ in range(1000):
      numbers = tuple(sorted(rng.integers(1, self.max_number + 1, size=self.num_numbers).tolist()))
      paths = _worked_steps(numbers, self.ops, self.max_result)
      reachable = sorted(v for v in paths if v <= self.max_target)
      if reachable:
        target = reachable[int(rng.integers(len(reachable)))]
        prompt = ",".join(map(str, numbers)) + f":{target}="
        return Example(
            prompt, str(target), {"task": self.name, "numbers": numbers, "target": target}
        )
    raise ValueError(
        f"countdown_steps: no target in [1, max_target={self.max_target}] is "
        "reachable; widen the task"
    )

  def demonstration(self, example, rng, corrupt_prob):
    paths = _worked_steps(tuple(example.meta["numbers"]), self.ops, self.max_result)
    target = example.meta["target"]
    wrong = rng.random() < corrupt_prob and len(paths) > 1
    pool = sorted(p for v, texts in paths.items() if (v != target) == wrong for p in texts)
    return pool[int(rng.integers(len(pool)))]

  def score(self, example, response):
    pool = list(example.meta["numbers"])
    steps = response.split(";")
    if len(steps) != len(pool) - 1:
      return 0.0
    for step in steps:
      m = _STEP_RE.fullmatch(step)
      if not m or any(len(t) > 1 and t[0] == "0" for t in m.group(1, 3, 4)):
        return 0.0
      a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
      for x in (a, b):
        if x not in pool:
          return 0.0
        pool.remove(x)
      if op == "/" and a % b or _apply(op, a, b) != c or not 1 <= c <= self.max_result:
        return 0.0
      pool.append(c)
    return float(pool == [example.meta["target"]])


@functools.lru_cache(maxsize=4096)
def _worked_steps(pool: tuple[int, ...], ops: str, max_result: int) -> dict[int, tuple[str, ...]]:
  """Final value -> the distinct worked-step texts that reach it from the sorted `pool`, each step
  `a op b=c` with a >= b and c in [1, max_result]."""
  if len(pool) == 1:
    return {pool[0]: ("",)}
  out: dict[int, set[str]] = {}
  for i, j in itertools.combinations(range(len(pool)), 2):
    b, a = pool[i], pool[j]  # sorted, so a >= b
    rest = pool[:i] + pool[i + 1 : j] + pool[j + 1 :]
    for op in ops:
      if op == "/" and a % b:
        continue
      c = int(_apply(op, a, b))
      if not 1 <= c <= max_result:
        continue
      step = f"{a}{op}{b}={c}"
      for value, texts in _worked_steps(tuple(sorted(rest + (c,))), ops, max_result).items():
        out.setdefault(value, set()).update(step + (";" + t if t else "") for t in texts)
  return {v: tuple(sorted(t)) for v, t in out.items()}


_TOKEN_RE = re.compile(r"\d+|[-+*/()]")


def _evaluate(text: str):
  """(exact value, numbers used) of an arithmetic expression, or (None, []) if malformed."""
  tokens = _TOKEN_RE.findall(text)
  if "".join(tokens) != text or not tokens:
    return None, []
  used: list[int] = []
  pos = 0

  def peek():
    return tokens[pos] if pos < len(tokens) else None

  def take():
    nonlocal pos
    pos += 1
    return tokens[pos - 1]

  def atom():
    tok = take() if peek() is not None else None
    if tok == "(":
      value = expr()
      if take() != ")":
        raise ValueError
      return value
    if tok is None or not tok.isdigit():
      raise ValueError
    used.append(int(tok))
    return fractions.Fraction(int(tok))

  def term():
    value = atom()
    while peek() in ("*", "/"):
      op = take()
      value = _apply(op, value, atom())
    return value

  def expr():
    value = term()
    while peek() in ("+", "-"):
      op = take()
      value = _apply(op, value, term())
    return value

  try:
    value = expr()
    if pos != len(tokens):
      return None, []
    return value, used
  except (ValueError, IndexError, ZeroDivisionError):
    return None, []


TASKS = {"arithmetic": ArithmeticChain, "countdown": Countdown, "countdown_steps": CountdownSteps}


def get_task(name: str, **kwargs) -> Task:
  """A task family by name (a key of TASKS) with its difficulty knobs."""
  if name not in TASKS:
    raise ValueError(f"task.name must be one of {sorted(TASKS)}, got {name!r}")
  return TASKS[name](**kwargs)


def alphabet(tasks=None) -> str:
  """Sorted union of the characters every task (default: all families) may write."""
  classes = [type(t) if isinstance(t, Task) else t for t in (tasks or TASKS.values())]
  return "".join(sorted(set("".join(c.alphabet for c in classes))))
