"""Warm start: demonstration batches, supervised training, evaluation, caching and the base window."""

import json
import os

import jax
import numpy as np
import pytest

from entropy_rl import sampling, warmstart
from entropy_rl.data import tasks as tasks_lib
from entropy_rl.data import tokenizer as tok_lib
from entropy_rl.models import Decoder, ModelConfig, init_params


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return tok_lib.build_char_tokenizer(tmp_path_factory.mktemp("tok"))


def _config(vocab_size, hidden=32, layers=1):
  return ModelConfig(
      vocab_size=vocab_size,
      hidden_size=hidden,
      intermediate_size=3 * hidden,
      num_layers=layers,
      num_heads=4,
      num_kv_heads=2,
      head_dim=hidden // 4,
      tie_word_embeddings=True,
      max_position_embeddings=1024,
  )


def test_demonstration_batch_layout(tokenizer):
  task = tasks_lib.get_task("arithmetic")
  tokens, attn, target = warmstart.demonstration_batch(
      task, tokenizer, seed=3, step=2, batch_size=6, corrupt_prob=0.5, max_new_tokens=32
  )
  again = warmstart.demonstration_batch(
      task, tokenizer, seed=3, step=2, batch_size=6, corrupt_prob=0.5, max_new_tokens=32
  )
  for a, b in zip((tokens, attn, target), again):
    np.testing.assert_array_equal(a, b)
  assert tokens.dtype == np.int32 and tokens.shape[1] % 8 == 0
  rng = np.random.default_rng([3, 2])
  for b in range(6):
    e = task.example(3, 2 * 6 + b, "train")
    response = task.demonstration(e, rng, 0.5)
    real = tokens[b][attn[b] > 0]
    assert tokenizer.decode(real) == "<bos>" + e.prompt + response + "<eos>"
    assert real[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(tokens[b][target[b] > 0], skip_special_tokens=True) == response
    assert target[b].sum() == len(response) + 1 and np.all(attn[b][target[b] > 0])
  # Prompts are left-padded so every response starts at the same column, as in the sampler.
  starts = np.argmax(target > 0, axis=1)
  assert len(set(starts.tolist())) == 1
  assert np.all(attn[:, starts[0] - 1] == 1)
  with pytest.raises(ValueError, match="max_new_tokens=4"):
    warmstart.demonstration_batch(
        task, tokenizer, seed=0, step=0, batch_size=4, corrupt_prob=0.0, max_new_tokens=4
    )


def test_supervised_training_lowers_the_loss(tokenizer):
  task = tasks_lib.get_task("countdown")
  cfg = _config(len(tokenizer))
  model = Decoder(cfg)
  params = init_params(cfg, jax.random.key(0))
  batch = warmstart.demonstration_batch(
      task, tokenizer, seed=9, step=0, batch_size=32, corrupt_prob=0.5, max_new_tokens=32
  )
  before = float(warmstart._loss(params, model, *batch))
  assert before == pytest.approx(np.log(len(tokenizer)), rel=0.1)
  params, _ = warmstart.train_supervised(
      model,
      params,
      task,
      tokenizer,
      steps=20,
      batch_size=32,
      lr=1e-2,
      corrupt_prob=0.5,
      seed=0,
      max_new_tokens=32,
  )
  assert float(warmstart._loss(params, model, *batch)) < 0.75 * before


def test_evaluate_task_scores_what_the_sampler_returns(tokenizer, monkeypatch):
  """With a stand-in sampler writing correct answers in even samples and wrong ones in odd
  samples, pass@1 is 1/2 and pass@4 is 1 (5 prompts in calls of 3, the last one padded)."""
  task = tasks_lib.get_task("arithmetic")
  examples = task.eval_examples(5)
  rng = np.random.default_rng(0)

  def fake_sample(model, params, prompt_BxP, prompt_mask_BxP, key, *, num_samples, **kw):
    del model, params, prompt_mask_BxP, key
    assert prompt_BxP.shape == (3, 32) and kw["stop_ids"] == (tokenizer.eos_token_id,)
    prompts = tokenizer.batch_decode(prompt_BxP, skip_special_tokens=True)
    rows = []
    for n in range(3 * num_samples):
      e = next(e for e in examples if e.prompt == prompts[n // num_samples])
      text = task.demonstration(e, rng, corrupt_prob=float(n % 2))
      ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
      rows.append(ids + [0] * (32 - len(ids)))
    tokens = np.array(rows, np.int32)
    mask = (
        np.cumsum(tokens == tokenizer.eos_token_id, axis=1) - (tokens == tokenizer.eos_token_id)
    ) == 0
    return sampling.SampleOutput(tokens, mask.astype(np.int32), None, None, None, None)

  monkeypatch.setattr(sampling, "sample", fake_sample)
  got = warmstart.evaluate_task(
      None,
      None,
      task,
      tokenizer,
      num_prompts=5,
      num_samples=4,
      max_new_tokens=32,
      max_prompt_len=32,
      prompts_per_call=3,
  )
  assert got == {"pass@1": 0.5, "pass@4": 1.0}


def test_warm_start_is_cached_and_reused(tokenizer, tmp_path, monkeypatch, capsys):
  task = tasks_lib.get_task("countdown")
  cfg = _config(len(tokenizer))
  kw = dict(
      workdir=str(tmp_path),
      steps=3,
      batch_size=8,
      lr=1e-3,
      corrupt_prob=0.5,
      seed=1,
      num_eval_prompts=4,
      num_eval_samples=4,
  )
  params, info = warmstart.warm_start(cfg, task, tokenizer, **kw)
  assert not info["cached"] and 0.0 <= info["pass@1"] <= info["pass@4"] <= 1.0
  assert "pass@1" in capsys.readouterr().out
  saved = json.loads((tmp_path / warmstart.INFO_FILE).read_text())
  assert saved["settings"]["steps"] == 3 and saved["pass@4"] == info["pass@4"]
  assert os.path.exists(tmp_path / warmstart.MODEL_DIR / "model.safetensors")

  monkeypatch.setattr(warmstart, "train_supervised", lambda *a, **k: pytest.fail("retrained"))
  again, info2 = warmstart.warm_start(cfg, task, tokenizer, **kw)
  assert info2["cached"] and info2["pass@1"] == info["pass@1"]
  assert "cached" in capsys.readouterr().out
  jax.tree.map(np.testing.assert_array_equal, params, again)
  with pytest.raises(pytest.fail.Exception, match="retrained"):
    warmstart.warm_start(cfg, task, tokenizer, **{**kw, "corrupt_prob": 0.4})


@pytest.mark.slow
def test_warm_start_lands_in_the_base_window(tmp_path):
  """The base window: pass@1 in [0.10, 0.40] and pass@16 in [0.55, 0.85] at T = 1, within
  5 minutes on 2 CPU cores, for the default model and task of the embedded config."""
  from entropy_rl import config_lib
  from entropy_rl import data

  c = config_lib.base_config()
  tokenizer = data.build_tokenizer(str(tmp_path / "tok"))
  m = c.model
  cfg = ModelConfig(
      vocab_size=len(tokenizer),
      hidden_size=m.hidden_size,
      intermediate_size=m.intermediate_size,
      num_layers=m.num_layers,
      num_heads=m.num_heads,
      num_kv_heads=m.num_kv_heads,
      head_dim=m.head_dim,
      tie_word_embeddings=True,
      max_position_embeddings=1024,
  )
  _, info = warmstart.warm_start(
      cfg, data.make_task(c.task), tokenizer, workdir=str(tmp_path / "ws")
  )
  assert 0.10 <= info["pass@1"] <= 0.40, info
  assert 0.55 <= info["pass@16"] <= 0.85, info
  assert info["train_seconds"] + info["eval_seconds"] <= 300, info
