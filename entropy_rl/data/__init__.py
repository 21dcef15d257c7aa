"""Synthetic tasks, tokenizers and prompt sources, and their construction from the run config.

The config-level entry points read `config.task` (source, name, path, split, data_dir,
question_field, answer_field, answer_format, template, max_prompt_len, and options: each synthetic
task's difficulty knobs) and `config.eval` (num_prompts, data_dir, files).
"""

from __future__ import annotations

import os

from entropy_rl.data.sources import (  # noqa: F401  (the package's API)
    ExampleListSource,
    JsonlSource,
    SyntheticSource,
    TfdsSource,
    encode_prompts,
    examples_from_records,
    format_prompt,
    read_jsonl,
)
from entropy_rl.data.tasks import TASKS, Example, Task, get_task  # noqa: F401
from entropy_rl.errors import ConfigError
from entropy_rl.data.tokenizer import build_char_tokenizer, decode_responses, load_tokenizer  # noqa: F401

# Field layout of the standard benchmark files (../shared/data/README.md), by file name.
BENCHMARKS = {
    "math500.jsonl": dict(question_field="problem", answer_field="answer"),
    "aime24.jsonl": dict(question_field="problem", answer_field="answer"),
    "amc23.jsonl": dict(question_field="problem", answer_field="answer"),
    "minerva_math.jsonl": dict(
        question_field="problem", answer_field="solution", answer_format="boxed"
    ),
    "olympiadbench.jsonl": dict(question_field="question", answer_field="final_answer"),
    "gsm8k_test.jsonl": dict(
        question_field="question", answer_field="answer", answer_format="gsm8k"
    ),
    "gsm8k_train.jsonl": dict(
        question_field="question", answer_field="answer", answer_format="gsm8k"
    ),
}
EVAL_SEED = 0  # the synthetic eval set is the same for every run


def build_tokenizer(path: str | os.PathLike):
  """The character tokenizer saved at `path` (built there first if absent), via AutoTokenizer."""
  if os.path.exists(os.path.join(path, "tokenizer.json")):
    return load_tokenizer(path)
  return build_char_tokenizer(path)


def make_task(task_cfg) -> Task:
  """The synthetic task `task_cfg.name` with its difficulty knobs `task_cfg.options[name]`."""
  return get_task(task_cfg.name, **dict(task_cfg.options.get(task_cfg.name, None) or {}))


def answer_format(task_cfg, path: str) -> str:
  """`task_cfg.answer_format`; 'auto' is the format of the benchmark file named like `path`
  (gsm8k_train.jsonl: the number after '####'), else the raw field."""
  if task_cfg.answer_format != "auto":
    return task_cfg.answer_format
  return BENCHMARKS.get(os.path.basename(str(path)), {}).get("answer_format", "raw")


def _text_kwargs(task_cfg, tokenizer):
  """Prompt formatting: `template`, or the tokenizer's chat template when it is empty."""
  if tokenizer is None:
    raise ValueError(
        f"config.task.source={task_cfg.source!r} needs the tokenizer (prompt length "
        "filter and chat template)"
    )
  if not task_cfg.template and not getattr(tokenizer, "chat_template", None):
    raise ConfigError(
        "config.task.template is empty, which means the tokenizer's chat template, but this "
        "tokenizer has none: set config.task.template to 'he', 'instruction', 'plain' or a "
        "str.format string with {question}"
    )
  return dict(
      template=task_cfg.template or "instruction",
      chat_template=not task_cfg.template,
      tokenizer=tokenizer,
      max_prompt_len=task_cfg.max_prompt_len,
  )


def make_source(
    task_cfg,
    *,
    seed: int,
    shard_index: int = 0,
    num_shards: int = 1,
    task: Task | None = None,
    tokenizer=None,
):
  """This host's training prompt source for `config.task`."""
  shards = dict(seed=seed, shard_index=shard_index, num_shards=num_shards)
  if task_cfg.source == "synthetic":
    return SyntheticSource(
        task or make_task(task_cfg), split=task_cfg.get("split", "train"), **shards
    )
  fields = dict(
      question_field=task_cfg.question_field,
      answer_field=task_cfg.answer_field,
      answer_format=answer_format(task_cfg, task_cfg.path),
  )
  if task_cfg.source == "jsonl":
    return JsonlSource(task_cfg.path, **fields, **_text_kwargs(task_cfg, tokenizer), **shards)
  if task_cfg.source == "tfds":
    return TfdsSource(
        task_cfg.path,
        split=task_cfg.split,
        data_dir=task_cfg.data_dir or None,
        **fields,
        **_text_kwargs(task_cfg, tokenizer),
        **shards,
    )
  raise ValueError(f"config.task.source must be synthetic, jsonl or tfds, got {task_cfg.source!r}")


def make_eval_examples(
    config, *, task: Task | None = None, tokenizer=None, shard_index: int = 0, num_shards: int = 1
) -> list[Example]:
  """This host's share (every num_shards-th) of the evaluation problems: the synthetic task's fixed
  eval split, or the first `eval.num_prompts` (-1: all) of each file in `eval.files` under
  `eval.data_dir`, fields from BENCHMARKS by file name; meta['source'] names the file."""
  n = config.eval.num_prompts
  if config.task.source == "synthetic" and not config.eval.files:
    if n < 1:
      raise ValueError(f"config.eval.num_prompts must be >= 1 for a synthetic task, got {n}")
    examples = (task or make_task(config.task)).eval_examples(n, seed=EVAL_SEED)
  else:
    if not config.eval.files:
      raise ConfigError("config.eval.files: name the benchmark files to evaluate on")
    examples = []
    for name in config.eval.files:
      path = os.path.join(config.eval.data_dir, name)
      if not os.path.exists(path):
        raise ConfigError(
            f"config.eval.files: {path} does not exist (config.eval.data_dir="
            f"{config.eval.data_dir!r})"
        )
      fields = BENCHMARKS.get(
          os.path.basename(name), dict(question_field="problem", answer_field="answer")
      )
      loaded = examples_from_records(
          read_jsonl(path), name=name, **fields, **_text_kwargs(config.task, tokenizer)
      )
      examples += loaded[:n] if n > 0 else loaded
  return examples[shard_index::num_shards]
