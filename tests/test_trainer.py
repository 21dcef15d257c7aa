"""The RL loop: resume after SIGTERM equals an uninterrupted run; faults that must not lose work;
bad configs; end to end."""

import logging
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from entropy_rl import (
    checkpoint,
    config_lib,
    distributed,
    fileio,
    interrupt,
    metrics,
    policy,
    trainer,
)
from entropy_rl.errors import ConfigError
from configs import grpo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
  with pytest.raises(interrupt.Interrupted, match="SIGTERM: checkpointed step 3") as stopped:
    trainer.train(c, cut)
  assert stopped.value.exit_code == 128 + signal.SIGTERM
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


def test_nonfinite_updates_stop_the_run_with_a_good_checkpoint(tmp_path, caplog):
  """lr = 1e30: every update overflows, so every step is skipped whole; after
  config.max_nonfinite_steps in a row the run stops, and the checkpoint it names holds the
  starting parameters (finite, with finite entropy), under the step numbers metrics.jsonl uses."""
  c = tiny_config(num_steps=8)
  c.eval_every = 0
  c.optim.lr, c.optim.grad_clip = 1e30, 1e30
  c.reward.overlong_buffer, c.reward.overlong_penalty = 12, 1.0  # a reward that varies at init
  c.max_nonfinite_steps = 2
  start = policy.build_policy(c, str(tmp_path / "p"), None)[1]
  with (
      caplog.at_level(logging.WARNING),
      pytest.raises(
          FloatingPointError, match="max_nonfinite_steps=2.*checkpoint 2 holds the state of step 0"
      ),
  ):
    trainer.train(c, str(tmp_path))
  recs = metrics.read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
  assert [(r["step"], r["nonfinite"]) for r in recs] == [(1, 1.0), (2, 1.0)]
  assert all(np.isfinite(r["entropy/token_mean"]) for r in recs)
  warned = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
  assert [w.split(":")[0] for w in warned] == ["step 1", "step 2"]
  assert checkpoint.Checkpointer(os.path.join(tmp_path, "checkpoints")).all_steps() == [2]
  for x, y in zip(jax.tree.leaves(_params(str(tmp_path), 2)), jax.tree.leaves(start)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_rerun_without_a_checkpoint_replaces_the_rows(tmp_path):
  """A run that died before its first checkpoint restarts at step 0 and rewrites every row."""
  c = tiny_config(num_steps=2)
  trainer.train(c, str(tmp_path))
  fileio_rm = __import__("shutil").rmtree
  fileio_rm(tmp_path / "checkpoints")
  trainer.train(c, str(tmp_path))
  assert [r["step"] for r in _records(str(tmp_path))] == [0, 1, 2]


def test_a_second_run_on_the_workdir_fails_naming_the_first(tmp_path):
  c = tiny_config(num_steps=1)
  with fileio.WorkdirLock(str(tmp_path)):
    with pytest.raises(
        ConfigError, match=f"--workdir={tmp_path} is in use by another run " f"\\(pid {os.getpid()}"
    ):
      trainer.train(c, str(tmp_path))
  assert not os.path.exists(tmp_path / "metrics.jsonl")
  trainer.train(c, str(tmp_path))  # the lock went with its holder
  assert [r["step"] for r in _records(str(tmp_path))] == [0, 1]


def test_ctrl_c_during_the_warm_start_stops_the_run(tmp_path, monkeypatch):
  from entropy_rl import warmstart

  c = tiny_config(num_steps=2)
  c.warm_start.enabled, c.warm_start.steps, c.warm_start.batch_size = True, 50, 8
  batch = warmstart.demonstration_batch

  def interrupt_at_step_3(*args, step, **kwargs):
    if step == 3:
      os.kill(os.getpid(), signal.SIGINT)
    return batch(*args, step=step, **kwargs)

  monkeypatch.setattr(warmstart, "demonstration_batch", interrupt_at_step_3)
  with pytest.raises(interrupt.Interrupted, match="SIGINT: nothing to checkpoint") as stopped:
    trainer.train(c, str(tmp_path))
  assert stopped.value.exit_code == 130
  assert not os.path.exists(tmp_path / "warm_start" / "warm_start.json")  # nothing half-cached
  assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_a_failed_background_save_stops_the_run_when_it_happens(tmp_path, monkeypatch):
  from orbax.checkpoint._src.path import atomicity

  async def disk_full(self, *args, **kwargs):
    raise OSError(28, "No space left on device")

  c = tiny_config(num_steps=6)
  c.eval_every, c.checkpoint_every = 0, 1
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", disk_full)
  with pytest.raises(
      checkpoint.CheckpointSaveError, match="saving checkpoint 1 .*No space left on device"
  ):
    trainer.train(c, str(tmp_path))
  assert max(r["step"] for r in _records(str(tmp_path))) <= 3  # caught within a step or two


def test_too_short_max_prompt_len_fails_before_the_warm_start(tmp_path):
  c = tiny_config(num_steps=1)
  c.warm_start.enabled = True
  c.task.max_prompt_len = 8
  with pytest.raises(ConfigError, match="config.task.max_prompt_len=8 is too small"):
    trainer.train(c, str(tmp_path))
  assert not os.path.exists(tmp_path / "warm_start")


def test_uri_workdir_caches_tokenizer_and_warm_start_there(tmp_path, monkeypatch):
  """A gs:// workdir (memory:// here) gets the tokenizer and the warm start through the same
  path layer as metrics; nothing lands in a local folder named after the scheme."""
  monkeypatch.chdir(tmp_path)
  c = tiny_config()
  c.warm_start.enabled, c.warm_start.steps, c.warm_start.batch_size = True, 2, 8
  uri = "memory://bucket/run"
  _, params = policy.build_policy(c, uri, __import__("entropy_rl").data.make_task(c.task))
  assert fileio.exists(uri + "/tokenizer/tokenizer.json")
  assert fileio.exists(uri + "/warm_start/warm_start.json")
  assert os.listdir(tmp_path) == []
  _, again = policy.build_policy(c, uri, __import__("entropy_rl").data.make_task(c.task))
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(again)):  # reloaded from the cache
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_reward_faults_are_logged(tmp_path):
  c = tiny_config(num_steps=1)
  trainer.train(c, str(tmp_path))
  last = _records(str(tmp_path))[-1]
  assert last["reward/timeouts"] == 0 and last["reward/errors"] == 0


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("rl.num_minibatches", 3, "config.rl.num_minibatches"),
        ("rl.num_microbatches", 3, "config.rl.num_microbatches"),
        ("loss.name", "dpo", "config.loss.name"),
        ("loss.token_mask_rho", 1.5, "config.loss.token_mask_rho"),
        ("rl.advantage", "ppo", "config.rl.advantage"),
        ("mesh.data", 3, "config.mesh"),
        ("model.source", "hf", "config.model.hf_path"),
        ("checkpoint_every", 0, "config.checkpoint_every"),
        ("keep_checkpoints", 0, "config.keep_checkpoints"),
        ("task.answer_format", "latex", "config.task.answer_format"),
        ("rl.filter_groups_metric", "len", "config.rl.filter_groups_metric"),
    ],
)
def test_bad_config_names_the_key(key, value, match):
  c = tiny_config()
  *section, field = key.split(".")
  (c[section[0]] if section else c)[field] = value
  with pytest.raises(ConfigError, match=match.replace(".", r"\.")):
    config_lib.validate(c, num_devices=8)


def test_jsonl_with_the_tiny_model_needs_a_template():
  c = tiny_config()
  c.task.source, c.task.path, c.reward.name = "jsonl", "/data/train.jsonl", "math"
  c.task.template = ""
  with pytest.raises(ConfigError, match="config.task.template is empty"):
    config_lib.validate(c, num_devices=8)


def test_task_options_and_answer_format_can_be_set():
  c = tiny_config()
  c.task.options.countdown.max_target = 20
  c.task.answer_format = "gsm8k"
  config_lib.validate(c, num_devices=8)
  from entropy_rl import data

  assert data.make_task(c.task).max_target == 20
  c.task.options.countdown.num_numbers = 9
  with pytest.raises(ConfigError, match="config.task.options.countdown"):
    config_lib.validate(c, num_devices=8)


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--config.rl.num_minibatchs=2"],
            "error: --config.rl.num_minibatchs=2: the config has no "
            "field 'rl.num_minibatchs'; did you mean config.rl.num_minibatches",
        ),
        (["--config.checkpoint_every=0"], "error: config.checkpoint_every=0: must be positive"),
        (["--config=configs/nope.py"], "error: --config: [Errno 2] No such file or directory"),
    ],
)
def test_cli_bad_input_is_one_line_naming_the_key(tmp_path, args, message):
  out = subprocess.run(
      [
          sys.executable,
          "-m",
          "entropy_rl.main",
          "--config=configs/default.py",
          f"--workdir={tmp_path}",
          *args,
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert out.returncode == 2
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert lines[-1].startswith(message), out.stderr
  assert not any("Traceback" in l for l in lines), out.stderr
  assert not os.path.exists(tmp_path / "metrics.jsonl")  # nothing ran


def test_cli_exits_143_on_sigterm_after_checkpointing(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(
      [
          sys.executable,
          "-m",
          "entropy_rl.main",
          "--config=configs/default.py",
          f"--workdir={workdir}",
          "--config.warm_start.enabled=False",
          "--config.num_steps=1000",
          "--config.eval_every=0",
          "--config.checkpoint_every=1000",
          "--config.rollout.prompts_per_step=8",
          "--config.rollout.num_samples=2",
          "--config.rl.num_minibatches=2",
      ],
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
  import time

  deadline = time.monotonic() + 240
  while time.monotonic() < deadline and not (
      os.path.exists(workdir / "metrics.jsonl") and _records(str(workdir))
  ):
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err
  assert "error: stopped by SIGTERM: checkpointed step" in err
  saved = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps()
  assert saved and saved[-1] == max(r["step"] for r in _records(str(workdir)))


@pytest.mark.slow
def test_default_config_improves_reward(tmp_path):
  """End to end: the embedded default (warm start + GRPO) raises the reward within its budget."""
  from configs import default

  c = default.get_config()
  trainer.train(c, str(tmp_path))
  recs = [
      r for r in metrics.read_metrics(os.path.join(tmp_path, "metrics.jsonl")) if "reward/mean" in r
  ]  # step 0 holds the starting policy's eval only
  first = np.mean([r["reward/mean"] for r in recs[:20]])
  last = np.mean([r["reward/mean"] for r in recs[-20:]])
  assert last > first + 0.05, (first, last)
  assert recs[-1]["entropy/token_mean"] < recs[0]["entropy/token_mean"]  # the collapse


def test_evaluation_never_holds_more_rows_than_a_training_rollout(monkeypatch, tmp_path):
  from entropy_rl import rollout, sampling

  c = tiny_config(num_steps=1)
  c.eval.num_samples = 8  # 8 prompts x 8 samples: twice a training rollout's 8 x 4 rows
  assert rollout.eval_rows_in_flight(config_lib.typed(c)) == 32
  c.eval.max_rows_in_flight = 0
  assert rollout.eval_rows_in_flight(config_lib.typed(c)) == 0
  c.eval.max_rows_in_flight, c.eval.at_start = -1, False
  seen = []
  sample = sampling.sample

  def record(*args, max_rows_in_flight=0, **kwargs):
    seen.append(max_rows_in_flight)
    return sample(*args, max_rows_in_flight=max_rows_in_flight, **kwargs)

  monkeypatch.setattr(sampling, "sample", record)
  trainer.train(c, str(tmp_path))
  assert [r["step"] for r in _records(str(tmp_path))] == [1]  # no step-0 evaluation
  assert seen == [0, 32, 32]  # the training rollout (all rows), then greedy and sampled eval


def test_extra_eval_temperatures_are_sampled_and_logged(monkeypatch, tmp_path):
  from entropy_rl import sampling

  c = tiny_config(num_steps=1)
  c.eval.at_start, c.eval.extra_temperatures = False, (0.6,)
  temps = []
  sample = sampling.sample

  def record(*args, temperature=1.0, greedy=False, **kwargs):
    temps.append("greedy" if greedy else temperature)
    return sample(*args, temperature=temperature, greedy=greedy, **kwargs)

  monkeypatch.setattr(sampling, "sample", record)
  trainer.train(c, str(tmp_path))
  k = c.eval.num_samples
  (rec,) = _records(str(tmp_path))
  assert temps[1:] == ["greedy", 1.0, 0.6]  # after the training rollout
  for key in (f"eval/avg@{k}", f"eval/pass@{k}", f"eval/T0.6/avg@{k}", f"eval/T0.6/pass@{k}"):
    assert 0.0 <= rec[key] <= 1.0, key
  c.eval.extra_temperatures = (0.0,)
  with pytest.raises(config_lib.ConfigError, match="config.eval.extra_temperatures"):
    config_lib.validate(c, 1)


@pytest.mark.parametrize("bucket", [0, 4])
def test_update_arrays_are_trimmed_to_the_length_bucket(monkeypatch, tmp_path, bucket):
  shapes = []
  make_batch = trainer.make_batch

  def record(roll, adv_N, mesh, pack_groups=0):
    batch = make_batch(roll, adv_N, mesh, pack_groups)
    shapes.append((batch.tokens.shape[1], batch.response_mask.shape[1], int(roll.mask.sum())))
    return batch

  monkeypatch.setattr(trainer, "make_batch", record)
  c = tiny_config(num_steps=2)
  c.eval_every, c.rl.length_bucket = 0, bucket
  trainer.train(c, str(tmp_path))
  full = c.task.max_prompt_len + c.rollout.max_new_tokens
  for tokens, response, n in shapes:
    if bucket == 0:
      assert (tokens, response) == (full, c.rollout.max_new_tokens)
    else:
      assert tokens % bucket == 0 and response % bucket == 0 and tokens < full and n > 0


def test_packed_run_equals_unpacked(monkeypatch, tmp_path):
  """`rl.packing`: the loop packs every step's rows (into fewer bins than rows here) and trains
  the same policy."""
  bins = []
  make_batch = trainer.make_batch

  def record(roll, adv_N, mesh, pack_groups=0):
    batch = make_batch(roll, adv_N, mesh, pack_groups)
    if batch.packed is not None:
      bins.append((batch.packed.tokens.shape[0], batch.tokens.shape[0]))
    return batch

  monkeypatch.setattr(trainer, "make_batch", record)
  runs = {}
  for packed in (False, True):
    c = tiny_config(num_steps=2)
    c.eval_every, c.rl.packing, c.rl.length_bucket = 0, packed, 0
    c.task.max_prompt_len = 64  # full-length rows of 76 tokens hold about 30
    trainer.train(c, str(tmp_path / str(packed)))
    runs[packed] = _records(tmp_path / str(packed))
  assert len(bins) == 2 and all(q < n for q, n in bins)
  fraction = [r["update/packed_token_fraction"] for r in runs[True]]
  np.testing.assert_allclose(fraction, [q / n for q, n in bins])
  for a, b in zip(runs[False], runs[True]):
    assert a["reward/mean"] == b["reward/mean"]
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)


def test_rows_in_flight_derived_from_the_device_memory(monkeypatch, tmp_path):
  """rollout.max_rows_in_flight=-1: the trainer samples as many rows as the KV budget holds."""
  from entropy_rl import sampling

  c = tiny_config(num_steps=1)
  c.eval_every = 0
  c.rollout.max_rows_in_flight, c.rollout.kv_cache_fraction = -1, 0.5
  # One float32 layer, 1 KV head of 16: 128 bytes a slot; 32 + 12 slots a row.
  row_bytes = 2 * 1 * 1 * 16 * 4 * (c.task.max_prompt_len + 12)
  monkeypatch.setattr(distributed, "device_memory", lambda: int(2.5 * row_bytes / 0.5))
  seen = []
  sample = sampling.sample

  def record(*args, max_rows_in_flight=0, **kwargs):
    seen.append(max_rows_in_flight)
    return sample(*args, max_rows_in_flight=max_rows_in_flight, **kwargs)

  monkeypatch.setattr(sampling, "sample", record)
  trainer.train(c, str(tmp_path))
  assert seen == [2 * 8]  # 2 rows on each of the 8 data-parallel devices
