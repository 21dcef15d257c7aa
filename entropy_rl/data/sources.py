"""Prompt sources: synthetic tasks, JSONL files and TFDS datasets, with a resumable data position.

Every source yields `next_batch(n) -> list[Example]` for this host and has a JSON-able position,
`get_state()` / `set_state(state)`, so a resumed run sees the same prompts in the same order.
Hosts read disjoint contiguous blocks of one global stream (`shard_index`, `num_shards`): when every
host calls `next_batch(n)` together, the call's global batch is the next num_shards * n examples and
host i reads the i-th block of n, so the hosts' batches stacked in shard order are what one process
reads with `next_batch(num_shards * n)` (the row order of a global batch sharded over the hosts). The
state records the global count consumed, so a run may resume on a different number of hosts when the
count divides evenly. Finite datasets are reshuffled every epoch by a permutation seeded with
(seed, epoch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import string
from typing import Any, Sequence

import numpy as np

from entropy_rl.data.tasks import Example, Task
from entropy_rl.errors import ConfigError
from entropy_rl.data.extract import extract_boxed, gsm8k_answer

log = logging.getLogger(__name__)

TEMPLATES = {  # str.format templates: a literal brace is written twice
    # HE (arXiv 2506.01939) prompt for base models.
    "he": (
        "User:\n{question}\nPlease reason step by step, and put your final answer within "
        "\\boxed{{}}.\n\nAssistant:\n"
    ),
    # The same instruction as a user message, for `chat_template=True`.
    "instruction": "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
    "plain": "{question}",
}
ANSWER_FORMATS = ("raw", "boxed", "gsm8k")


class _Sharded:
  """The global-stream bookkeeping shared by all sources."""

  def __init__(self, shard_index: int, num_shards: int):
    if num_shards < 1 or not 0 <= shard_index < num_shards:
      raise ValueError(f"shard_index must be in [0, num_shards={num_shards}), got {shard_index}")
    self.shard_index, self.num_shards = shard_index, num_shards
    self.position = 0  # examples this host has consumed

  def _global_indices(self, n: int) -> list[int]:
    if n < 0:
      raise ValueError(f"batch size must be >= 0, got {n}")
    start = self.position * self.num_shards + self.shard_index * n
    self.position += n
    return list(range(start, start + n))

  def _identity(self) -> dict[str, Any]:
    raise NotImplementedError

  def get_state(self) -> dict[str, Any]:
    """The data position: identity of the stream plus the global number of examples consumed."""
    return {**self._identity(), "consumed": self.position * self.num_shards}

  def set_state(self, state: dict[str, Any]) -> None:
    for key, value in self._identity().items():
      if state.get(key) != value:
        raise ValueError(
            f"data state field '{key}' is {state.get(key)!r}, this source has {value!r}"
        )
    consumed = int(state["consumed"])
    if consumed % self.num_shards:
      raise ValueError(
          f"data state consumed={consumed} is not divisible by num_shards={self.num_shards}"
      )
    self.position = consumed // self.num_shards


class SyntheticSource(_Sharded):
  """An infinite seeded stream of one task's problems; example g is `task.example(seed, g, split)`."""

  def __init__(
      self,
      task: Task,
      *,
      split: str = "train",
      seed: int = 0,
      shard_index: int = 0,
      num_shards: int = 1,
  ):
    super().__init__(shard_index, num_shards)
    self.task, self.split, self.seed = task, split, seed
    task.example(seed, 0, split)  # validates the split

  def next_batch(self, n: int) -> list[Example]:
    return [self.task.example(self.seed, g, self.split) for g in self._global_indices(n)]

  def _identity(self):
    return {"source": f"synthetic:{self.task!r}", "split": self.split, "seed": self.seed}


class ExampleListSource(_Sharded):
  """A finite list of examples read as an endless stream, reshuffled every epoch if `shuffle`."""

  def __init__(
      self,
      examples: Sequence[Example],
      *,
      name: str,
      shuffle: bool = True,
      seed: int = 0,
      shard_index: int = 0,
      num_shards: int = 1,
  ):
    super().__init__(shard_index, num_shards)
    if not examples:
      raise ValueError(f"{name}: no examples")
    self.examples, self.name, self.shuffle, self.seed = list(examples), name, shuffle, seed
    digest = hashlib.blake2b(digest_size=8)
    for ex in self.examples:
      digest.update(ex.prompt.encode() + b"\0" + ex.answer.encode() + b"\0")
    self.fingerprint = digest.hexdigest()
    self._epoch, self._order = -1, None

  def _order_of(self, epoch: int) -> np.ndarray:
    if epoch != self._epoch:
      n = len(self.examples)
      self._order = (
          np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
      )
      self._epoch = epoch
    return self._order

  def next_batch(self, n: int) -> list[Example]:
    out = []
    for g in self._global_indices(n):
      epoch, i = divmod(g, len(self.examples))
      out.append(self.examples[self._order_of(epoch)[i]])
    return out

  def _identity(self):
    return {
        "source": self.name,
        "fingerprint": self.fingerprint,
        "num_examples": len(self.examples),
        "shuffle": self.shuffle,
        "seed": self.seed,
    }


def format_prompt(
    question: str, template: str = "he", *, tokenizer=None, chat_template: bool = False
) -> str:
  """`template` (a name in TEMPLATES or a str.format string whose only field is `{question}`, with
  literal braces doubled) filled in, optionally wrapped in the tokenizer's chat template as a user
  turn followed by the generation prompt."""
  text = TEMPLATES.get(template, template)
  try:
    fields = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
  except ValueError:
    fields = None
  if fields != {"question"}:
    raise ValueError(
        f"template must be one of {sorted(TEMPLATES)} or a str.format string whose only "
        f"field is {{question}} (write literal braces as {{{{ }}}}), got {template!r}"
    )
  text = text.format(question=question)
  if chat_template:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
      raise ValueError("chat_template=True needs a tokenizer that has a chat template")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
  return text


def answer_text(value: Any, answer_format: str = "raw") -> str | None:
  """The gold answer as text: numbers without a spurious `.0`, lists joined by ', ', and for
  `boxed` / `gsm8k` the last \\boxed{} content / the number after '####' (None if absent)."""
  if answer_format not in ANSWER_FORMATS:
    raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
  if isinstance(value, (list, tuple)):
    text = ", ".join(answer_text(v) for v in value)
  elif isinstance(value, float) and value.is_integer():
    text = str(int(value))
  else:
    text = str(value)
  if answer_format == "boxed":
    return extract_boxed(text)
  if answer_format == "gsm8k":
    return gsm8k_answer(text)
  return text


def question_and_answer(
    where: str, record: dict, question_field: str, answer_field: str, answer_format: str
) -> tuple[str, str]:
  """(question, answer) of one record; a missing field or unparsable answer names `where`."""
  for field in (question_field, answer_field):
    if field not in record:
      raise ConfigError(
          f"{where}: missing field '{field}'; fields present: {sorted(record)} "
          "(config.task.question_field / config.task.answer_field)"
      )
  answer = answer_text(record[answer_field], answer_format)
  if answer is None:
    raise ConfigError(
        f"{where}: field '{answer_field}' has no {answer_format} answer "
        "(config.task.answer_format)"
    )
  return str(record[question_field]), answer


def examples_from_records(
    records,
    *,
    name: str,
    question_field: str = "problem",
    answer_field: str = "answer",
    answer_format: str = "raw",
    template: str = "he",
    tokenizer=None,
    chat_template: bool = False,
    max_prompt_len: int | None = None,
) -> list[Example]:
  """Examples from (location, dict) pairs; prompts longer than `max_prompt_len` tokens are dropped
  and counted. A missing field or unparsable answer names the location; nothing left is an error."""
  examples, wheres = [], []
  for index, (where, record) in enumerate(records):
    wheres.append(where)
    question, answer = question_and_answer(
        where, record, question_field, answer_field, answer_format
    )
    prompt = format_prompt(question, template, tokenizer=tokenizer, chat_template=chat_template)
    examples.append(Example(prompt, answer, {"question": question, "index": index, "source": name}))
  if not examples:
    raise ConfigError(f"{name}: the dataset is empty")
  if max_prompt_len is not None:
    if tokenizer is None:
      raise ValueError("max_prompt_len needs a tokenizer to count prompt tokens")
    lengths = [len(ids) for ids in _encode(tokenizer, examples, wheres)]
    kept = [e for e, n in zip(examples, lengths) if n <= max_prompt_len]
    log.info(
        "%s: dropped %d of %d prompts longer than max_prompt_len=%d tokens",
        name,
        len(examples) - len(kept),
        len(examples),
        max_prompt_len,
    )
    if not kept:
      raise ConfigError(
          f"{name}: all {len(examples)} prompts exceed max_prompt_len="
          f"{max_prompt_len} tokens (config.task.max_prompt_len)"
      )
    examples = kept
  return examples


def _encode(tokenizer, examples, wheres) -> list[list[int]]:
  """Token ids of every prompt; a prompt the tokenizer cannot encode names its record."""
  try:
    return tokenizer([e.prompt for e in examples])["input_ids"]
  except Exception:  # pylint: disable=broad-except
    for e, where in zip(examples, wheres):
      try:
        tokenizer([e.prompt])
      except Exception as err:  # pylint: disable=broad-except
        known = set(tokenizer.get_vocab())
        unknown = "".join(sorted({ch for ch in e.prompt if ch not in known}))
        hint = (
            f"the characters {unknown!r} are not in its vocabulary (the tiny model's "
            "character tokenizer covers only the synthetic tasks' alphabet; use a real model, "
            "config.model.source='hf')"
            if unknown
            else str(err)
        )
        raise ConfigError(f"{where}: the tokenizer cannot encode this prompt: {hint}") from None
    raise


def read_jsonl(path: str | os.PathLike) -> list[tuple[str, dict]]:
  """(f'{path}:{line}', record) for each non-blank line; a malformed line names its file and line."""
  out = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ConfigError(
            f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})"
        ) from None
      if not isinstance(record, dict):
        raise ConfigError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
      out.append((f"{path}:{lineno}", record))
  return out


class JsonlSource(ExampleListSource):
  """Prompts from a JSONL file with configurable question/answer fields and prompt template."""

  def __init__(
      self,
      path: str | os.PathLike,
      *,
      question_field: str = "problem",
      answer_field: str = "answer",
      answer_format: str = "raw",
      template: str = "he",
      tokenizer=None,
      chat_template: bool = False,
      max_prompt_len: int | None = None,
      shuffle: bool = True,
      seed: int = 0,
      shard_index: int = 0,
      num_shards: int = 1,
  ):
    name = f"jsonl:{os.path.basename(path)}"
    examples = examples_from_records(
        read_jsonl(path),
        name=name,
        question_field=question_field,
        answer_field=answer_field,
        answer_format=answer_format,
        template=template,
        tokenizer=tokenizer,
        chat_template=chat_template,
        max_prompt_len=max_prompt_len,
    )
    super().__init__(
        examples,
        name=name,
        shuffle=shuffle,
        seed=seed,
        shard_index=shard_index,
        num_shards=num_shards,
    )


def _plain(value):
  """TFDS record values as Python: bytes -> str, numpy -> scalars and lists."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray):
    return [_plain(v) for v in value.tolist()] if value.ndim else _plain(value.item())
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, list):
    return [_plain(v) for v in value]
  return value


def tfds_records(name: str, split: str, data_dir: str | os.PathLike | None = None):
  """(location, record) pairs of a prepared TFDS dataset read via `tfds.data_source`, never downloading."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  data_dir = os.fspath(
      data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
  )
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    n = len(source)
  except (AssertionError, FileNotFoundError, NotImplementedError, ValueError) as e:
    raise ValueError(
        f"TFDS dataset '{name}' split '{split}' is not prepared as ArrayRecord in {data_dir} "
        f"({type(e).__name__}). Prepare it once where the network is allowed with "
        f"`tfds build {name.split('/')[0]} --data_dir={data_dir} --file_format=array_record` "
        f"(for a config: --config=...), or build one from local JSONL files with "
        f"`python -m entropy_rl.data.tfds_builder --name={name.split('/')[0]} --data_dir={data_dir} "
        f"--split={split}=FILE.jsonl`, then point data_dir (or TFDS_DATA_DIR) at it. Nothing is "
        f"downloaded at run time."
    ) from e
  return [
      (f"tfds:{name}[{split}] record {i}", {k: _plain(v) for k, v in source[i].items()})
      for i in range(n)
  ]


class TfdsSource(ExampleListSource):
  """Prompts from a prepared TFDS dataset (ArrayRecord, read without TensorFlow)."""

  def __init__(
      self,
      name: str,
      *,
      split: str = "train",
      data_dir: str | os.PathLike | None = None,
      question_field: str = "question",
      answer_field: str = "answer",
      answer_format: str = "raw",
      template: str = "he",
      tokenizer=None,
      chat_template: bool = False,
      max_prompt_len: int | None = None,
      shuffle: bool = True,
      seed: int = 0,
      shard_index: int = 0,
      num_shards: int = 1,
  ):
    full_name = f"tfds:{name}[{split}]"
    examples = examples_from_records(
        tfds_records(name, split, data_dir),
        name=full_name,
        question_field=question_field,
        answer_field=answer_field,
        answer_format=answer_format,
        template=template,
        tokenizer=tokenizer,
        chat_template=chat_template,
        max_prompt_len=max_prompt_len,
    )
    super().__init__(
        examples,
        name=full_name,
        shuffle=shuffle,
        seed=seed,
        shard_index=shard_index,
        num_shards=num_shards,
    )


def encode_prompts(tokenizer, prompts: Sequence[str], max_len: int):
  """(prompt_BxP, prompt_mask_BxP) int32, left-padded to P = max_len with the tokenizer's pad id."""
  ids = tokenizer(list(prompts))["input_ids"]
  prompt_BxP = np.full((len(ids), max_len), tokenizer.pad_token_id, np.int32)
  prompt_mask_BxP = np.zeros((len(ids), max_len), np.int32)
  for b, row in enumerate(ids):
    if len(row) > max_len:
      raise ValueError(f"prompt {b} has {len(row)} tokens > max_len={max_len}: {prompts[b][:80]!r}")
    if row:
      prompt_BxP[b, max_len - len(row) :] = row
      prompt_mask_BxP[b, max_len - len(row) :] = 1
  return prompt_BxP, prompt_mask_BxP
