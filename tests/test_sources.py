"""Prompt sources: synthetic, JSONL and TFDS; resumable positions, sharding, bad input, real files."""

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from entropy_rl.data import sources as src_lib
from entropy_rl.data import tasks as tasks_lib
from entropy_rl.data import tfds_builder
from entropy_rl.data import tokenizer as tok_lib

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "math500.jsonl").exists(), reason="no ../shared/data")

HE = (
    "User:\n{question}\nPlease reason step by step, and put your final answer within \\boxed{}."
    "\n\nAssistant:\n"
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return tok_lib.build_char_tokenizer(tmp_path_factory.mktemp("tok"))


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


ROWS = [{"problem": f"What is {i}+{i}?", "answer": str(2 * i), "level": i % 3} for i in range(10)]


def _prompts(batch):
  return [e.prompt for e in batch]


def test_synthetic_source_resumes_in_the_same_order():
  task = tasks_lib.get_task("arithmetic")
  a = src_lib.SyntheticSource(task, seed=5)
  first = a.next_batch(4)
  state = json.loads(json.dumps(a.get_state()))
  rest = [a.next_batch(3), a.next_batch(5)]
  b = src_lib.SyntheticSource(task, seed=5)
  b.set_state(state)
  assert [b.next_batch(3), b.next_batch(5)] == rest
  assert first == [task.example(5, g, "train") for g in range(4)]
  with pytest.raises(ValueError, match="seed"):
    src_lib.SyntheticSource(task, seed=6).set_state(state)
  with pytest.raises(ValueError, match="source"):
    src_lib.SyntheticSource(tasks_lib.get_task("countdown"), seed=5).set_state(state)


def test_synthetic_eval_split_source():
  task = tasks_lib.get_task("countdown")
  batch = src_lib.SyntheticSource(task, split="eval").next_batch(20)
  assert all(tasks_lib.split_of(e.prompt, task.eval_fraction) == "eval" for e in batch)


def test_jsonl_round_trip_with_template(tmp_path):
  path = _write_jsonl(tmp_path / "d.jsonl", ROWS)
  s = src_lib.JsonlSource(path, shuffle=False)
  assert len(s.examples) == 10
  e = s.next_batch(1)[0]
  assert e.prompt == HE.replace("{question}", "What is 0+0?") and e.answer == "0"
  assert e.meta["question"] == "What is 0+0?"
  custom = src_lib.JsonlSource(
      path,
      question_field="answer",
      answer_field="level",
      template="Q: {question} A:",
      shuffle=False,
  )
  assert [(e.prompt, e.answer) for e in custom.next_batch(2)] == [
      ("Q: 0 A:", "0"),
      ("Q: 2 A:", "1"),
  ]


def test_chat_template(tmp_path, tokenizer):
  path = _write_jsonl(tmp_path / "d.jsonl", ROWS[:2])
  with pytest.raises(ValueError, match="chat template"):
    src_lib.JsonlSource(path, tokenizer=tokenizer, chat_template=True)
  tokenizer.chat_template = (
      "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
      "{% if add_generation_prompt %}<|assistant|>{% endif %}"
  )
  try:
    s = src_lib.JsonlSource(
        path, tokenizer=tokenizer, chat_template=True, template="instruction", shuffle=False
    )
  finally:
    tokenizer.chat_template = None
  assert s.examples[1].prompt == (
      "<|user|>What is 1+1?\nPlease reason step by step, and put your "
      "final answer within \\boxed{}.<|assistant|>"
  )


def test_length_filter_counts_and_logs(tmp_path, tokenizer, caplog):
  rows = [{"q": "1" * n, "a": "1"} for n in (3, 10, 5, 20)]
  path = _write_jsonl(tmp_path / "d.jsonl", rows)
  with caplog.at_level(logging.INFO):
    s = src_lib.JsonlSource(
        path,
        question_field="q",
        answer_field="a",
        template="plain",
        tokenizer=tokenizer,
        max_prompt_len=6,
        shuffle=False,
    )
  assert [e.prompt for e in s.examples] == ["111", "11111"]  # 1 + n tokens with <bos>
  assert "dropped 2 of 4" in caplog.text
  with pytest.raises(ValueError, match="all 4 prompts exceed max_prompt_len=2"):
    src_lib.JsonlSource(
        path,
        question_field="q",
        answer_field="a",
        template="plain",
        tokenizer=tokenizer,
        max_prompt_len=2,
    )
  with pytest.raises(ValueError, match="needs a tokenizer"):
    src_lib.JsonlSource(path, question_field="q", answer_field="a", max_prompt_len=2)


def test_epochs_reshuffle_seeded_and_resume(tmp_path):
  path = _write_jsonl(tmp_path / "d.jsonl", ROWS)
  s = src_lib.JsonlSource(path, seed=1)
  epochs = [_prompts(s.next_batch(10)) for _ in range(3)]
  assert all(sorted(ep) == sorted(epochs[0]) for ep in epochs)
  assert epochs[0] != epochs[1] != epochs[2]
  t = src_lib.JsonlSource(path, seed=1)
  t.next_batch(13)
  state = t.get_state()
  after = _prompts(t.next_batch(12))
  u = src_lib.JsonlSource(path, seed=1)
  u.set_state(state)
  assert _prompts(u.next_batch(12)) == after == (epochs[1] + epochs[2])[3:15]
  assert _prompts(src_lib.JsonlSource(path, seed=2).next_batch(10)) != epochs[0]
  _write_jsonl(path, ROWS[:9])
  with pytest.raises(ValueError, match="fingerprint"):
    src_lib.JsonlSource(path, seed=1).set_state(state)


def test_sharding_splits_each_global_batch_in_blocks(tmp_path):
  path = _write_jsonl(tmp_path / "d.jsonl", ROWS)
  whole = _prompts(src_lib.JsonlSource(path, seed=3).next_batch(24))
  shards = [src_lib.JsonlSource(path, seed=3, shard_index=i, num_shards=2) for i in range(2)]
  got = [[_prompts(s.next_batch(6)) for s in shards] for _ in range(2)]
  assert [p for call in got for host in call for p in host] == whole
  # Resume the two-host position on one host: same global stream.
  single = src_lib.JsonlSource(path, seed=3)
  single.set_state(shards[0].get_state())
  assert single.get_state()["consumed"] == 24
  assert (
      _prompts(single.next_batch(4))
      == _prompts(src_lib.JsonlSource(path, seed=3).next_batch(28))[24:]
  )
  task = tasks_lib.get_task("arithmetic")
  syn = [src_lib.SyntheticSource(task, shard_index=i, num_shards=3).next_batch(2) for i in range(3)]
  assert [e for b in syn for e in b] == src_lib.SyntheticSource(task).next_batch(6)
  with pytest.raises(ValueError, match="shard_index"):
    src_lib.SyntheticSource(task, shard_index=3, num_shards=3)
  three = src_lib.JsonlSource(path, num_shards=3)
  with pytest.raises(ValueError, match="divisible"):
    three.set_state({**three.get_state(), "consumed": 4})


def test_bad_jsonl_input(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"problem": "a", "answer": "1"}\n\n{"problem": "b", "answer": 2\n')
  with pytest.raises(ValueError, match=r"bad\.jsonl:3: malformed JSON"):
    src_lib.JsonlSource(bad)
  missing = _write_jsonl(
      tmp_path / "m.jsonl", [{"problem": "a", "answer": "1"}, {"question": "b", "answer": "2"}]
  )
  with pytest.raises(
      ValueError,
      match=r"m\.jsonl:2: missing field 'problem'; fields present: \['answer', 'question'\]",
  ):
    src_lib.JsonlSource(missing)
  empty = tmp_path / "e.jsonl"
  empty.write_text("\n")
  with pytest.raises(ValueError, match="empty"):
    src_lib.JsonlSource(empty)
  with pytest.raises(ValueError, match="template"):
    src_lib.JsonlSource(_write_jsonl(tmp_path / "d.jsonl", ROWS), template="no placeholder")
  with pytest.raises(ValueError, match="has no gsm8k answer"):
    src_lib.JsonlSource(tmp_path / "d.jsonl", answer_format="gsm8k")


def test_local_tfds_round_trip(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds

  monkeypatch.setattr(
      tfds.core.download.DownloadManager,
      "download",
      lambda *a, **k: pytest.fail("a test reached a download"),
  )
  train = _write_jsonl(tmp_path / "train.jsonl", ROWS)
  test = _write_jsonl(tmp_path / "test.jsonl", [{"problem": "x?", "answer": 1.0}])
  data_dir = tmp_path / "tfds"
  out = tfds_builder.build_jsonl_dataset("tiny_math", {"train": train, "test": test}, data_dir)
  assert Path(out, "dataset_info.json").exists()
  assert any(p.name.startswith("tiny_math-train.array_record") for p in Path(out).iterdir())
  s = src_lib.TfdsSource("tiny_math", split="train", data_dir=data_dir, shuffle=False)
  j = src_lib.JsonlSource(train)
  assert sorted((e.prompt, e.answer) for e in s.examples) == sorted(
      (e.prompt, e.answer) for e in j.examples
  )
  t = src_lib.TfdsSource("tiny_math", split="test", data_dir=data_dir, template="plain")
  assert [(e.prompt, e.answer) for e in t.examples] == [("x?", "1")]
  state = s.get_state()
  assert s.next_batch(3) == src_lib.TfdsSource(
      "tiny_math", data_dir=data_dir, shuffle=False
  ).next_batch(3)
  assert "tensorflow" not in sys.modules  # ArrayRecord read without TensorFlow
  s2 = src_lib.TfdsSource("tiny_math", data_dir=data_dir, shuffle=False)
  s2.set_state(state)
  assert s2.position == 0


def test_unprepared_tfds_explains_instead_of_downloading(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds

  monkeypatch.setattr(
      tfds.core.DatasetBuilder,
      "download_and_prepare",
      lambda *a, **k: pytest.fail("a test tried to prepare a dataset"),
  )
  for name in ("gsm8k", "math_dataset"):
    with pytest.raises(
        ValueError, match=rf"'{name}' split 'train' is not prepared.*tfds build {name}"
    ):
      src_lib.TfdsSource(name, data_dir=tmp_path)
  assert not any(tmp_path.rglob("*.array_record*"))


def test_tfds_builder_bad_input(tmp_path):
  rows = _write_jsonl(tmp_path / "r.jsonl", [{"question": "q"}])
  with pytest.raises(ValueError, match="missing field 'answer'"):
    tfds_builder.build_jsonl_dataset("x", {"train": rows}, tmp_path, question_field="question")
  with pytest.raises(ValueError, match="snake_case"):
    tfds_builder.build_jsonl_dataset("Bad-Name", {"train": rows}, tmp_path)
  empty = tmp_path / "e.jsonl"
  empty.write_text("")
  with pytest.raises(ValueError, match="no records"):
    tfds_builder.build_jsonl_dataset("x", {"train": empty}, tmp_path)


@needs_data
def test_real_benchmark_files_load():
  math500 = src_lib.JsonlSource(DATA / "math500.jsonl", shuffle=False)
  assert len(math500.examples) == 500 and math500.examples[0].prompt.startswith("User:\n")
  gsm = src_lib.JsonlSource(
      DATA / "gsm8k_test.jsonl", question_field="question", answer_format="gsm8k", shuffle=False
  )
  assert len(gsm.examples) == 1319
  assert all(np.isfinite(float(e.answer)) for e in gsm.examples)  # every '#### N' parses
  assert gsm.examples[0].answer == "18"
  minerva = src_lib.JsonlSource(
      DATA / "minerva_math.jsonl", answer_field="solution", answer_format="boxed"
  )
  assert len(minerva.examples) == 272 and all(e.answer for e in minerva.examples)
  amc = src_lib.JsonlSource(DATA / "amc23.jsonl", shuffle=False)
  assert amc.examples[0].answer == "27"
  olympiad = src_lib.JsonlSource(
      DATA / "olympiadbench.jsonl", question_field="question", answer_field="final_answer"
  )
  assert len(olympiad.examples) == 675
  aime = src_lib.JsonlSource(DATA / "aime24.jsonl")
  assert len(aime.examples) == 30 and all(int(e.answer) >= 0 for e in aime.examples)


def test_encode_prompts_real_tokenizer_path(tokenizer):
  prompt_BxP, mask_BxP = src_lib.encode_prompts(tokenizer, ["1+2=", ""], max_len=6)
  assert prompt_BxP.shape == (2, 6)
  np.testing.assert_array_equal(mask_BxP.sum(1), [5, 1])  # the empty prompt is just <bos>


def _config():
  from entropy_rl import config_lib

  return config_lib.base_config()


def test_sources_from_the_run_config(tmp_path, tokenizer):
  from entropy_rl import data

  c = _config()
  c.task.source, c.task.name = "synthetic", "arithmetic"
  task = data.make_task(c.task)
  assert isinstance(task, tasks_lib.ArithmeticChain)
  batch = data.make_source(c.task, seed=1).next_batch(3)
  assert batch == [task.example(1, g, "train") for g in range(3)]
  c.eval.num_prompts = 6
  evals = data.make_eval_examples(c, task=task)
  assert evals == task.eval_examples(6, seed=data.EVAL_SEED)
  assert data.make_eval_examples(c, task=task, shard_index=1, num_shards=2) == evals[1::2]
  c.task.source, c.task.path, c.task.template = (
      "jsonl",
      str(_write_jsonl(tmp_path / "d.jsonl", ROWS)),
      "{question}",
  )
  with pytest.raises(ValueError, match="needs the tokenizer"):
    data.make_source(c.task, seed=0)
  s = data.make_source(c.task, seed=0, tokenizer=_byte_tokenizer(tmp_path / "bytes"))
  assert sorted(e.prompt for e in s.examples) == sorted(r["problem"] for r in ROWS)
  assert data.build_tokenizer(tmp_path / "tok")("1+1")["input_ids"] == tokenizer("1+1")["input_ids"]
  c.task.source = "parquet"
  with pytest.raises(ValueError, match="config.task.source"):
    data.make_source(c.task, seed=0, tokenizer=tokenizer)


def _byte_tokenizer(path):
  """A stand-in for a real model's tokenizer: byte-level, every text encodes, has a chat template."""
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers

  vocab = {
      c: i for i, c in enumerate(["<pad>", "<eos>"] + sorted(pre_tokenizers.ByteLevel.alphabet()))
  }
  tok = Tokenizer(models.BPE(vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>"
  )
  fast.chat_template = (
      "{% for m in messages %}<user>{{ m['content'] }}{% endfor %}"
      "{% if add_generation_prompt %}<assistant>{% endif %}"
  )
  fast.save_pretrained(str(path))
  return tok_lib.load_tokenizer(path)


@needs_data
def test_benchmark_eval_examples_from_the_run_config(tmp_path):
  from entropy_rl import data

  tok = _byte_tokenizer(tmp_path)
  c = _config()
  c.task.source, c.task.template, c.task.max_prompt_len = "jsonl", "he", 4096
  c.eval.data_dir, c.eval.num_prompts = str(DATA), 3
  c.eval.files = tuple(data.BENCHMARKS)
  evals = data.make_eval_examples(c, tokenizer=tok)
  assert len(evals) == 3 * len(data.BENCHMARKS)
  assert [e.meta["source"] for e in evals[::3]] == list(data.BENCHMARKS)
  assert evals[0].prompt == src_lib.TEMPLATES["he"].format(question=evals[0].meta["question"])
  by_file = {e.meta["source"]: e for e in evals}
  assert by_file["gsm8k_test.jsonl"].answer == "70000"  # the third problem's '#### 70000'
  assert (
      by_file["minerva_math.jsonl"].answer and "boxed" not in by_file["minerva_math.jsonl"].answer
  )
  c.task.template = ""  # the tokenizer's chat template around the boxed-answer instruction
  e = data.make_eval_examples(c, tokenizer=tok)[0]
  assert e.prompt.startswith("<user>") and e.prompt.endswith("\\boxed{}.<assistant>")
  with pytest.raises(ValueError, match="needs the tokenizer"):
    data.make_eval_examples(c)
  c.eval.files = ("nope.jsonl",)
  with pytest.raises(ValueError, match="nope.jsonl does not exist"):
    data.make_eval_examples(c, tokenizer=tok)


def test_gsm8k_training_file_scores_against_the_final_number(tmp_path):
  from entropy_rl import data

  c = _config()
  rows = [
      {
          "question": "Tom has 3 apples and buys 4. How many?",
          "answer": "He has 3 + 4 = 7 apples.\n#### 7",
      }
  ]
  c.task.source, c.task.template = "jsonl", "{question}"
  c.task.path = str(_write_jsonl(tmp_path / "gsm8k_train.jsonl", rows))
  c.task.question_field, c.task.max_prompt_len = "question", 256
  tok = _byte_tokenizer(tmp_path / "bytes")
  assert c.task.answer_format == "auto"
  assert [e.answer for e in data.make_source(c.task, seed=0, tokenizer=tok).examples] == ["7"]
  c.task.path = str(_write_jsonl(tmp_path / "other.jsonl", rows))
  assert data.make_source(c.task, seed=0, tokenizer=tok).examples[0].answer == rows[0]["answer"]
  c.task.answer_format = "gsm8k"
  assert [e.answer for e in data.make_source(c.task, seed=0, tokenizer=tok).examples] == ["7"]


def test_text_outside_the_tiny_alphabet_names_the_line(tmp_path, tokenizer):
  from entropy_rl.errors import ConfigError

  rows = [
      {"problem": "1+1=", "answer": "2"},
      {"problem": "2*3=", "answer": "6"},
      {"problem": "Wie viel ist 2+2?", "answer": "4"},
  ]
  path = _write_jsonl(tmp_path / "d.jsonl", rows)
  with pytest.raises(
      ConfigError,
      match=f"{path}:3: the tokenizer cannot encode this prompt: "
      "the characters ' \\?Weilstv' are not in its vocabulary",
  ):
    src_lib.JsonlSource(path, template="{question}", tokenizer=tokenizer, max_prompt_len=64)


def test_empty_template_without_a_chat_template_names_the_field(tmp_path, tokenizer):
  from entropy_rl import data
  from entropy_rl.errors import ConfigError

  c = _config()
  c.task.source, c.task.template = "jsonl", ""
  c.task.path = str(_write_jsonl(tmp_path / "d.jsonl", ROWS))
  with pytest.raises(ConfigError, match="config.task.template is empty"):
    data.make_source(c.task, seed=0, tokenizer=tokenizer)
