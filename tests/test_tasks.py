"""Synthetic tasks (exact checkers, determinism, disjoint splits) and the character tokenizer."""

import itertools

import numpy as np
import pytest

from entropy_rl.data import tasks as tasks_lib
from entropy_rl.data import tokenizer as tok_lib
from entropy_rl.data.sources import encode_prompts

TASKS = [
    tasks_lib.get_task("arithmetic"),
    tasks_lib.get_task("countdown"),
    tasks_lib.get_task("countdown_steps"),
    tasks_lib.get_task("countdown", num_numbers=4, max_number=5, max_target=60, ops="+-*/"),
    tasks_lib.get_task("countdown_steps", num_numbers=4, max_number=20, ops="+-*/"),
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return tok_lib.build_char_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("task", TASKS, ids=lambda t: repr(t))
def test_generation_is_deterministic_per_seed(task):
  a = [task.example(3, i, "train") for i in range(20)]
  b = [task.example(3, i, "train") for i in range(20)]
  c = [task.example(4, i, "train") for i in range(20)]
  assert a == b
  assert [e.prompt for e in a] != [e.prompt for e in c]
  assert task.eval_examples(30, seed=1) == task.eval_examples(30, seed=1)


@pytest.mark.parametrize("task", TASKS, ids=lambda t: repr(t))
def test_train_and_eval_are_disjoint(task):
  train = {task.example(0, i, "train").prompt for i in range(1500)}
  evals = {e.prompt for e in task.eval_examples(100)}
  assert len(evals) == 100 and not train & evals
  assert all(tasks_lib.split_of(p, task.eval_fraction) == "train" for p in train)
  assert all(tasks_lib.split_of(p, task.eval_fraction) == "eval" for p in evals)
  with pytest.raises(ValueError, match="split"):
    task.example(0, 0, "test")


@pytest.mark.parametrize("task", TASKS, ids=lambda t: repr(t))
def test_demonstrations_are_right_or_wrong_as_asked(task):
  rng = np.random.default_rng(0)
  examples = [task.example(0, i, "train") for i in range(200)]
  assert all(task.score(e, task.demonstration(e, rng, 0.0)) == 1.0 for e in examples)
  assert all(task.score(e, task.demonstration(e, rng, 1.0)) == 0.0 for e in examples)
  frac = np.mean([task.score(e, task.demonstration(e, rng, 0.4)) for e in examples])
  assert 0.5 < frac < 0.7


@pytest.mark.parametrize("task", TASKS[:3], ids=lambda t: repr(t))
def test_default_tasks_are_short_and_in_alphabet(task):
  rng = np.random.default_rng(0)
  alphabet = set(tasks_lib.alphabet())
  for i in range(300):
    e = task.example(0, i, "train")
    r = task.demonstration(e, rng, 0.5)
    assert len(e.prompt) <= 24 and len(r) <= 32
    assert set(e.prompt + r) <= alphabet


def test_arithmetic_checker():
  task = tasks_lib.get_task("arithmetic", num_terms=3)
  e = next(e for i in range(100) if (e := task.example(0, i, "train")).prompt.count("-") == 0)
  values = e.meta["values"]
  first, final = values[0] + values[1], sum(values)
  assert e.prompt == f"{values[0]}+{values[1]}+{values[2]}="
  assert task.score(e, f"{first};{final}") == 1.0
  assert task.score(e, f"{first + 1};{final}") == 1.0  # graded on the final answer
  assert task.score(e, f"{final}") == 1.0
  for wrong in [
      f"{first};{final + 1}",
      f"{final};{first}",
      "",
      ";",
      f"{first};{final};",
      f"{first};x{final}",
      f"{first} {final}",
      f"{first};+{final}",
  ]:
    assert task.score(e, wrong) == 0.0, wrong
  neg = tasks_lib.Example("1-5=", "-4", {"values": [1, 5], "signs": ["-"]})
  assert task.score(neg, "-4") == 1.0 and task.score(neg, "4") == 0.0


def _reference_value(expr):
  """Python's own evaluation (integers, + - * and parentheses only) as the independent reference."""
  assert set(expr) <= set("0123456789+-*()")
  return eval(expr, {"__builtins__": {}})  # pylint: disable=eval-used


def test_countdown_checker_accepts_every_correct_answer():
  task = tasks_lib.get_task("countdown")
  for i in range(10):
    e = task.example(0, i, "train")
    numbers, target = list(e.meta["numbers"]), e.meta["target"]
    n_correct = 0
    # Every fully parenthesised expression over every order and operator choice, scored independently.
    for perm in set(itertools.permutations(numbers)):
      for ops in itertools.product("+-*", repeat=2):
        for expr in (
            f"({perm[0]}{ops[0]}{perm[1]}){ops[1]}{perm[2]}",
            f"{perm[0]}{ops[0]}({perm[1]}{ops[1]}{perm[2]})",
        ):
          want = float(_reference_value(expr) == target)
          assert task.score(e, expr) == want, (e.prompt, expr)
          n_correct += want
    assert n_correct >= 1
  e = tasks_lib.Example("3,7,9:12=", "12", {"numbers": (3, 7, 9), "target": 12})
  assert task.score(e, "9+7-3*(1)") == 0.0  # uses a number not given
  for good in ["3+9", "9+3"]:  # misses 7
    assert task.score(e, good) == 0.0
  assert task.score(e, "3*(9-7)+9-3") == 0.0  # reuses numbers
  for bad in ["", "3+", "(3+7", "3+7)", "3++7-9", "37-9", "3+7-9=", "3 + 7 - 9", "-3+7+9"]:
    assert task.score(e, bad) == 0.0, bad
  e = tasks_lib.Example("2,4,6:3=", "3", {"numbers": (2, 4, 6), "target": 3})
  assert task.score(e, "6/(4-2)") == 1.0 and task.score(e, "6/(2-2)*4") == 0.0


def test_countdown_demonstrations_are_diverse():
  task = tasks_lib.get_task("countdown")
  rng = np.random.default_rng(0)
  e = max(
      (task.example(0, i, "train") for i in range(50)),
      key=lambda e: len(
          tasks_lib._expressions(tuple(e.meta["numbers"]), task.ops)[e.meta["target"]]
      ),
  )
  demos = {task.demonstration(e, rng, 0.0) for _ in range(50)}
  assert len(demos) >= 3


def _worked(text):
  """[(a, op, b, c)] of `a op b=c;...` by the standard library, the independent reference."""
  out = []
  for step in text.split(";"):
    lhs, c = step.split("=")
    op = next(o for o in "+-*/" if o in lhs)
    a, b = lhs.split(op)
    out.append((int(a), op, int(b), int(c)))
  return out


def _reference_steps_score(numbers, target, text, max_result):
  pool = list(numbers)
  for a, op, b, c in _worked(text):
    value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]
    if value != c or not 1 <= c <= max_result or a not in pool:
      return 0.0
    pool.remove(a)
    if b not in pool:
      return 0.0
    pool.remove(b)
    pool.append(c)
  return float(pool == [target])


def test_countdown_steps_checker_matches_a_reference_on_every_path():
  """Every sequence of steps over the pool (both operand orders, every operator, true results and
  results off by one) is scored as the reference scores it; each problem has a correct path."""
  task = tasks_lib.get_task("countdown_steps", num_numbers=3, ops="+-*/")
  for i in range(8):
    e = task.example(0, i, "train")
    numbers, target = e.meta["numbers"], e.meta["target"]

    def paths(pool):
      if len(pool) == 1:
        yield []
        return
      for x, y in itertools.permutations(range(len(pool)), 2):
        a, b = pool[x], pool[y]
        rest = [v for k, v in enumerate(pool) if k not in (x, y)]
        for op in "+-*/":
          exact = {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]
          for c in {int(exact), int(exact) + 1}:
            if c >= 1:
              for tail in paths(rest + [c]):
                yield [f"{a}{op}{b}={c}"] + tail

    n_correct = 0
    for path in paths(list(numbers)):
      text = ";".join(path)
      want = _reference_steps_score(numbers, target, text, task.max_result)
      assert task.score(e, text) == want, (e.prompt, text)
      n_correct += want
    assert n_correct >= 1


def test_countdown_steps_checker_rejects_malformed():
  task = tasks_lib.get_task("countdown_steps")
  e = tasks_lib.Example("3,7,9:20=", "20", {"numbers": (3, 7, 9), "target": 20})
  assert task.score(e, "9*3=27;27-7=20") == 1.0
  assert task.score(e, "3*9=27;27-7=20") == 1.0  # either operand order
  for bad in [
      "9*3=27;27-7=20;",
      "9*3=27",
      "9*3=27;27-7=20;20-0=20",
      "9*3=28;28-7=21",
      "9*3=27;7-27=20",
      "9*3=27;27-3=24",
      "9*3=027;27-7=20",
      "9*03=27;27-7=20",
      "9 *3=27;27-7=20",
      "9*3=27,27-7=20",
      "",
      ";",
      "9*3=27;27-7=20=20",
      "7-9=-2;...",
  ]:
    assert task.score(e, bad) == 0.0, bad
  e = tasks_lib.Example("2,9,12:50=", "50", {"numbers": (2, 9, 12), "target": 50})
  assert task.score(e, "12*9=108;108/2=54") == 0.0  # 108 > max_result = 99
  e = tasks_lib.Example("2,4,6:9=", "9", {"numbers": (2, 4, 6), "target": 9})
  div = tasks_lib.get_task("countdown_steps", num_numbers=3, ops="+-*/")
  assert div.score(e, "6/4=1;2+1=3") == 0.0 and div.score(e, "4/2=2;6+2=8") == 0.0
  assert div.score(tasks_lib.Example("", "8", e.meta | {"target": 8}), "4/2=2;6+2=8") == 1.0


def test_countdown_steps_demonstrations_fork_only_on_choices():
  """Right and corrupted demonstrations alike are valid worked steps (true results, numbers from
  the pool, the larger operand first); corrupted ones end off the target; right ones are diverse."""
  task = tasks_lib.get_task("countdown_steps")
  rng = np.random.default_rng(0)
  for i in range(100):
    e = task.example(0, i, "train")
    for corrupt in (0.0, 1.0):
      text = task.demonstration(e, rng, corrupt)
      steps = _worked(text)
      assert len(steps) == task.num_numbers - 1 and all(a >= b for a, _, b, _ in steps)
      assert all(1 <= c <= task.max_result for *_, c in steps)
      assert _reference_steps_score(e.meta["numbers"], steps[-1][3], text, task.max_result) == 1.0
      assert (steps[-1][3] == e.meta["target"]) == (corrupt == 0.0)
  e = max(
      (task.example(0, i, "train") for i in range(50)),
      key=lambda e: len(
          tasks_lib._worked_steps(e.meta["numbers"], task.ops, task.max_result)[e.meta["target"]]
      ),
  )
  assert len({task.demonstration(e, rng, 0.0) for _ in range(50)}) >= 3


def test_countdown_steps_targets_and_options():
  task = tasks_lib.get_task("countdown_steps", num_numbers=3, max_number=6, max_target=30)
  targets = [task.example(0, i, "train").meta["target"] for i in range(300)]
  assert 1 <= min(targets) and max(targets) <= 30 and len(set(targets)) > 20
  e = task.example(0, 0, "train")
  assert e.prompt == ",".join(map(str, e.meta["numbers"])) + f":{e.meta['target']}="
  assert list(e.meta["numbers"]) == sorted(e.meta["numbers"]) and max(e.meta["numbers"]) <= 6
  default = tasks_lib.get_task("countdown_steps")  # a held-out set of >= 1,024 problems exists
  prompts = [
      ",".join(map(str, c)) + f":{v}="
      for c in itertools.combinations_with_replacement(range(1, default.max_number + 1), 3)
      for v in tasks_lib._worked_steps(c, default.ops, default.max_result)
      if v <= 99
  ]
  assert sum(tasks_lib.split_of(p, default.eval_fraction) == "eval" for p in prompts) >= 1024
  from entropy_rl import config_lib  # pylint: disable=import-outside-toplevel

  options = config_lib.base_config().task.options.countdown_steps
  assert dict(options) == {
      "eval_fraction": 0.1,
      "num_numbers": 3,
      "max_number": 20,
      "max_target": 99,
      "max_result": 99,
      "ops": "+-*",
  }


def test_bad_knobs():
  with pytest.raises(ValueError, match="num_terms"):
    tasks_lib.get_task("arithmetic", num_terms=1)
  with pytest.raises(ValueError, match="ops"):
    tasks_lib.get_task("countdown", ops="+^")
  with pytest.raises(ValueError, match="eval_fraction"):
    tasks_lib.get_task("countdown", eval_fraction=0.0)
  with pytest.raises(ValueError, match="task.name"):
    tasks_lib.get_task("sudoku")
  with pytest.raises(ValueError, match="reachable"):
    tasks_lib.get_task("countdown", ops="-", num_numbers=2, max_number=1).example(0, 0, "train")
  with pytest.raises(ValueError, match="countdown_steps.num_numbers"):
    tasks_lib.get_task("countdown_steps", num_numbers=6)
  with pytest.raises(ValueError, match="countdown_steps.max_result"):
    tasks_lib.get_task("countdown_steps", max_result=50)
  with pytest.raises(ValueError, match="reachable"):
    tasks_lib.get_task("countdown_steps", ops="-", num_numbers=2, max_number=1).example(
        0, 0, "train"
    )


def test_tokenizer_round_trip(tokenizer, tmp_path):
  assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
  assert len(tokenizer) == 3 + len(tasks_lib.alphabet())
  rng = np.random.default_rng(0)
  for task in TASKS:
    for i in range(20):
      e = task.example(0, i, "train")
      text = e.prompt + task.demonstration(e, rng, 0.5)
      ids = tokenizer(text)["input_ids"]
      assert ids[0] == tokenizer.bos_token_id and len(ids) == len(text) + 1
      assert tokenizer.decode(ids, skip_special_tokens=True) == text
  tok_lib.build_char_tokenizer(tmp_path, "0123456789+-;=")
  again = tok_lib.load_tokenizer(tmp_path)
  chars = sorted("0123456789+-;=")
  assert again("12+3=")["input_ids"] == [1] + [3 + chars.index(c) for c in "12+3="]
  assert again.decode(again("12+3=")["input_ids"]) == "<bos>12+3="
  with pytest.raises(Exception, match="UNK"):
    tokenizer("12x")


def test_decode_responses(tokenizer):
  eos = tokenizer.eos_token_id
  ids = [tokenizer.convert_tokens_to_ids(c) for c in "12;3"]
  tokens = np.array([ids + [eos, 0], ids[:2] + [0, 0, 0, 0]])
  mask = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]])
  assert tok_lib.decode_responses(tokenizer, tokens, mask) == ["12;3", "12"]


def test_encode_prompts_left_pads(tokenizer):
  prompt_BxP, mask_BxP = encode_prompts(tokenizer, ["1+2=", "12+34="], max_len=9)
  assert prompt_BxP.dtype == np.int32 and mask_BxP.dtype == np.int32 and prompt_BxP.shape == (2, 9)
  np.testing.assert_array_equal(
      mask_BxP, [[0, 0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1, 1]]
  )
  np.testing.assert_array_equal(prompt_BxP[0, :4], 0)
  assert prompt_BxP[0, 4] == tokenizer.bos_token_id
  assert tokenizer.decode(prompt_BxP[1, 3:]) == "12+34="
  with pytest.raises(ValueError, match="max_len=4"):
    encode_prompts(tokenizer, ["12+34="], max_len=4)
