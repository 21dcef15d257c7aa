"""The RL loop: resume after SIGTERM equals an uninterrupted run; bad configs; end to end."""
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from entropy_rl import checkpoint, config_lib, metrics, trainer
from configs import grpo

VOLATILE = ("time/", "throughput/")


def tiny_config(num_steps=6):
  c = grpo.get_config("tiny")
  c.num_steps = num_steps
  c.warm_start.enabled = False
  c.rollout.prompts_per_step, c.rollout.num_samples, c.rollout.max_new_tokens = 8, 4, 12
  c.rl.num_minibatches = 2
  c.model.hidden_size, c.model.intermediate_size, c.model.num_layers = 32, 64, 1
  c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 2, 1, 16
  c.optim.lr, c.optim.warmup_steps = 1e-3, 0
  c.eval_every, c.eval.num_prompts, c.eval.num_samples = 3, 8, 2
  c.checkpoint_every = 100
  return c


def _records(workdir):
  out = []
  for r in metrics.read_metrics(os.path.join(workdir, "metrics.jsonl")):
    out.append({k: v for k, v in r.items() if not k.startswith(VOLATILE)})
  return out


def _params(workdir, step):
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  state, _ = ckpt.restore(step)
  ckpt.close()
  return state["params"]


def test_sigterm_resume_equals_uninterrupted(tmp_path, monkeypatch):
  c = tiny_config()
  full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
  trainer.train(c, full)

  write = metrics.MetricsWriter.write

  def write_then_preempt(self, step, m):
    write(self, step, m)
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(metrics.MetricsWriter, "write", write_then_preempt)
  trainer.train(c, cut)
  assert checkpoint.Checkpointer(os.path.join(cut, "checkpoints")).all_steps() == [3]
  assert [r["step"] for r in _records(cut)] == [0, 1, 2, 3]  # step 0: the starting policy's eval
  monkeypatch.setattr(metrics.MetricsWriter, "write", write)
  trainer.train(c, cut)  # the same command again: resumes at step 3

  a, b = _records(full), _records(cut)
  assert [r["step"] for r in b] == [0, 1, 2, 3, 4, 5, 6]
  assert a == b
  for x, y in zip(jax.tree.leaves(_params(full, 6)), jax.tree.leaves(_params(cut, 6))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert os.path.exists(os.path.join(full, "curves.png"))
  assert "reward/mean" in open(os.path.join(full, "summary.md")).read()


def test_resume_with_other_model_shape_fails_clearly(tmp_path):
  c = tiny_config(num_steps=1)
  c.eval_every = 0
  trainer.train(c, str(tmp_path))
  c2 = tiny_config(num_steps=2)
  c2.model.hidden_size = 48
  with pytest.raises(checkpoint.CheckpointShapeError, match="shape mismatch|no entry"):
    trainer.train(c2, str(tmp_path))


def test_nonfinite_updates_stop_the_run_with_a_checkpoint(tmp_path):
  """A huge learning rate blows the params up; the following non-finite updates are skipped and
  after config.max_nonfinite_steps in a row the run stops with the last good state saved."""
  c = tiny_config(num_steps=8)
  c.eval_every = 0
  c.optim.lr, c.optim.grad_clip = 1e30, 1e30
  c.reward.overlong_buffer, c.reward.overlong_penalty = 12, 1.0  # a reward that varies at init
  c.max_nonfinite_steps = 2
  with pytest.raises(FloatingPointError, match="max_nonfinite_steps=2"):
    trainer.train(c, str(tmp_path))
  recs = metrics.read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
  assert [r["nonfinite"] for r in recs][-2:] == [1.0, 1.0]
  steps = checkpoint.Checkpointer(os.path.join(tmp_path, "checkpoints")).all_steps()
  assert steps == [recs[-1]["step"]]


@pytest.mark.parametrize("key,value,match", [
    ("rl.num_minibatches", 3, "config.rl.num_minibatches"),
    ("rl.num_microbatches", 3, "config.rl.num_microbatches"),
    ("loss.name", "dpo", "config.loss.name"),
    ("loss.token_mask_rho", 1.5, "config.loss.token_mask_rho"),
    ("rl.advantage", "ppo", "config.rl.advantage"),
    ("mesh.data", 3, "config.mesh"),
    ("model.source", "hf", "config.model.hf_path"),
])
def test_bad_config_names_the_key(key, value, match):
  c = tiny_config()
  section, field = key.split(".")
  c[section][field] = value
  with pytest.raises(ValueError, match=match.replace(".", r"\.")):
    config_lib.validate(c, num_devices=8)


def test_cli_refuses_an_unknown_key(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
      [sys.executable, "-m", "entropy_rl.main", "--config=configs/default.py",
       f"--workdir={tmp_path}", "--config.rl.num_minibatchs=2"],
      cwd=root, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "num_minibatchs" in out.stderr
  assert not os.listdir(tmp_path)  # nothing ran


@pytest.mark.slow
def test_default_config_improves_reward(tmp_path):
  """End to end: the embedded default (warm start + GRPO) raises the reward within its budget."""
  from configs import default
  c = default.get_config()
  trainer.train(c, str(tmp_path))
  recs = [r for r in metrics.read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
          if "reward/mean" in r]  # step 0 holds the starting policy's eval only
  first = np.mean([r["reward/mean"] for r in recs[:20]])
  last = np.mean([r["reward/mean"] for r in recs[-20:]])
  assert last > first + 0.05, (first, last)
  json.dumps(recs[-1])


def test_law_hint_recovers_the_ceiling():
  h = np.linspace(0.6, 0.2, 60)
  r = -0.3 * np.exp(h) + 0.7 + np.random.default_rng(0).normal(0, 0.005, 60)
  hint = trainer.law_hint(np.stack([h, r], 1).tolist(), 60)
  assert abs(hint["law/ceiling"] - 0.4) < 0.02 and hint["law/r2"] > 0.95
  assert trainer.law_hint([[0.5, 0.1]] * 29, 29) == {}  # fewer than 3 windows of 10 steps
