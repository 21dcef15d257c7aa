"""The study runner's bookkeeping: the code stamp of each run and the config it launches."""

import dataclasses
import json
import os
import shutil
import re

import pytest

from entropy_rl import config_lib
from entropy_rl.data import tasks as tasks_lib
from experiments import common


def test_code_version_names_the_commit():
  v = common.code_version()
  if v["commit"] is None:
    pytest.skip("not a git checkout")
  assert re.fullmatch(r"[0-9a-f]{40}", v["commit"]) and isinstance(v["dirty"], bool)


def test_same_code_groups_runs_by_their_stamp(tmp_path):
  specs = [common.RunSpec(f"r{i}", "grpo") for i in range(3)]
  for s, code in zip(specs, [{"commit": "a"}, {"commit": "a"}, {"commit": "a", "dirty": True}]):
    os.makedirs(common.run_dir(str(tmp_path), s))
    with open(os.path.join(common.run_dir(str(tmp_path), s), "spec.json"), "w") as f:
      json.dump({"name": s.name, "code": code}, f)
  assert common.same_code(str(tmp_path), specs) == {"a": ["r0", "r1"], "a+dirty": ["r2"]}
  missing = common.RunSpec("never_run", "grpo")
  assert common.same_code(str(tmp_path), [missing]) == {"None": ["never_run"]}


def test_same_code_groups_commits_that_changed_only_experiments(tmp_path):
  # 6bab813 changed experiments/ only; its entropy_rl/ and configs/ are 9561127's.
  if common.code_of("6bab813") == "6bab813":
    pytest.skip("history not in this checkout")
  specs = [common.RunSpec(f"r{i}", "grpo") for i in range(3)]
  for s, commit in zip(specs, ["9561127", "6bab813", "16dbb59"]):
    os.makedirs(common.run_dir(str(tmp_path), s))
    with open(os.path.join(common.run_dir(str(tmp_path), s), "spec.json"), "w") as f:
      json.dump({"name": s.name, "code": {"commit": commit, "dirty": False}}, f)
  groups = common.same_code(str(tmp_path), specs)
  assert len(groups) == 2 and ["r0", "r1"] in groups.values() and ["r2"] in groups.values()


def test_a_run_resumed_on_other_code_shows_both(tmp_path, monkeypatch):
  s = common.RunSpec("r0", "grpo")
  path = common.run_dir(str(tmp_path), s)
  os.makedirs(path)
  with open(os.path.join(path, "spec.json"), "w") as f:
    json.dump({"name": s.name, "code": {"commit": "old", "dirty": False}}, f)
  monkeypatch.setattr(common, "code_version", lambda: {"commit": "new", "dirty": False})
  monkeypatch.setattr(common.subprocess, "call", lambda *a, **k: 0)  # the run itself
  monkeypatch.setattr(common.machine, "cpu_kind", lambda: "EPYC (avx2)")
  common.ensure_run(str(tmp_path), s, log=lambda _: None)
  assert common.same_code(str(tmp_path), [s]) == {"old then new": ["r0"]}
  # Its first launch predates the machine stamp; a third launch on another CPU adds that one.
  assert common.same_machine(str(tmp_path), [s]) == {"unrecorded then EPYC (avx2)": ["r0"]}
  monkeypatch.setattr(common.machine, "cpu_kind", lambda: "EPYC (avx512f)")
  common.ensure_run(str(tmp_path), s, log=lambda _: None)
  assert common.same_machine(str(tmp_path), [s]) == {
      "unrecorded then EPYC (avx2) then EPYC (avx512f)": ["r0"]
  }


def test_load_config_applies_overrides_and_refuses_unknown_keys():
  c = common.load_config("grpo", "tiny", {"rollout.num_samples": 4})
  assert c.rollout.num_samples == 4
  with pytest.raises(KeyError):
    common.load_config("grpo", "tiny", {"rollout.num_sample": 4})


def test_settings_pick_the_task_its_warm_start_and_the_run_names(tmp_path):
  steps = common.run_settings(False, 100, setting="steps")
  c = common.load_config("grpo", "tiny", steps)
  config_lib.validate(c, 1)
  assert c.task.name == "countdown_steps" and c.warm_start.steps == 1200
  assert tasks_lib.get_task(c.task.name, **c.task.options[c.task.name]).name == "countdown_steps"
  plain = common.load_config("grpo", "tiny", common.run_settings(False, 100))
  assert plain.task.name == "countdown" and plain.task.options.countdown.ops == "+-*"
  assert common.run_tag(False, "tiny", "steps") == "f_steps"
  assert common.run_tag(True, "tiny") == "q"
  assert common.run_tag(False, "qwen2_5_7b", "steps") == "f_qwen2_5_7b"
  # A paper preset reads its data: the setting changes nothing there.
  assert common.run_settings(False, 100, setting="steps", preset="qwen2_5_7b") == (
      common.run_settings(False, 100, preset="qwen2_5_7b")
  )
  root = str(tmp_path)
  assert common.warm_dir(root, {}) == os.path.join(root, "_warm_start")
  assert common.warm_dir(root, steps) == os.path.join(root, "_warm_start_countdown_steps")


def test_every_study_runs_the_setting_it_is_given():
  from experiments import (
      study_covariance_methods,
      study_entropy_control,
      study_entropy_dynamics,
      study_entropy_law,
      study_forking_tokens,
      study_methods,
  )

  specs = [
      *study_entropy_law.grpo_specs(False, 2, 100, setting="steps"),
      *[
          x
          for v in study_covariance_methods.method_specs(False, 2, 100, setting="steps").values()
          for x in v
      ],
      *[
          x
          for runs in study_forking_tokens.forking_specs(
              False, 1, 50, 100, True, setting="steps"
          ).values()
          for x in runs.values()
      ],
      *study_entropy_control.control_specs(False, 50, 100, setting="steps").values(),
      study_entropy_dynamics.dynamics_spec(False, 5, setting="steps"),
      *[
          x
          for v in study_methods.arm_specs(
              study_methods.validation_settings(False, 100, 20, 64, "steps"),
              1,
              False,
              setting="steps",
          ).values()
          for x in v
      ],
  ]
  for s in specs:
    assert s.name.startswith(("f_steps_", "mf_steps_")), s.name
    c = common.load_config(s.family, s.arg, s.config_overrides())
    assert c.task.name == "countdown_steps" and c.warm_start.corrupt_prob == 0.55, s.name


def _fake_run(path, steps):
  """A finished run's records in `path` as the trainer writes them."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    for i in range(1, steps + 1):
      f.write(json.dumps({"step": i, "entropy/token_mean": 1.0 / i}) + "\n")
  with open(os.path.join(path, "summary.md"), "w") as f:
    f.write("done\n")


def test_a_finished_run_is_archived_and_restored_on_another_machine(tmp_path, monkeypatch):
  s = common.RunSpec("f_r0", "grpo", overrides=(("num_steps", 3), ("seed", 0)))
  archive, calls = str(tmp_path / "archive"), []

  def run(cmd, **_):
    calls.append(cmd)
    _fake_run(cmd[cmd.index("--workdir") + 1], 3)
    return 0

  monkeypatch.setattr(common.subprocess, "call", run)
  first = common.ensure_run(str(tmp_path / "a"), s, log=lambda _: None, archive=archive)
  assert len(calls) == 1 and sorted(os.listdir(os.path.join(archive, "f_r0"))) == [
      "metrics.jsonl.gz",
      "spec.json",
      "summary.md",
  ]
  # A fresh root (another machine) restores the records instead of running again.
  second = common.ensure_run(str(tmp_path / "b"), s, log=lambda _: None, archive=archive)
  assert len(calls) == 1
  assert common.read_records(second) == common.read_records(first)
  assert common.same_code(str(tmp_path / "b"), [s]) == common.same_code(str(tmp_path / "a"), [s])
  # Without the archive it runs; another run archived under the same name is refused.
  common.ensure_run(str(tmp_path / "c"), s, log=lambda _: None)
  assert len(calls) == 2
  other = dataclasses.replace(s, overrides=(("num_steps", 3), ("seed", 1)))
  with pytest.raises(ValueError, match="another run under the name f_r0"):
    common.ensure_run(str(tmp_path / "d"), other, log=lambda _: None, archive=archive)


def test_smoke_overrides_never_reach_the_archive(tmp_path, monkeypatch):
  s = common.RunSpec("f_r0", "grpo", overrides=(("num_steps", 3),))
  monkeypatch.setenv("ENTROPY_RL_EXTRA_OVERRIDES", json.dumps({"num_steps": 3}))
  monkeypatch.setattr(
      common.subprocess,
      "call",
      lambda cmd, **_: _fake_run(cmd[cmd.index("--workdir") + 1], 3) or 0,
  )
  common.ensure_run(str(tmp_path / "a"), s, log=lambda _: None, archive=str(tmp_path / "arch"))
  assert not os.path.exists(tmp_path / "arch")


def test_the_warm_start_fingerprint_names_its_weights(tmp_path):
  from entropy_rl import warmstart

  warm = tmp_path / "_warm_start"
  assert common.warm_start_sha256(str(warm)) is None
  (warm / warmstart.MODEL_DIR).mkdir(parents=True)
  (warm / warmstart.MODEL_DIR / "model.safetensors").write_bytes(b"weights")
  sha = common.warm_start_sha256(str(warm))
  assert sha == __import__("hashlib").sha256(b"weights").hexdigest()
  specs = [common.RunSpec(f"r{i}", "grpo") for i in range(2)]
  for s, w in zip(specs, [sha, None]):
    os.makedirs(common.run_dir(str(tmp_path), s))
    with open(os.path.join(common.run_dir(str(tmp_path), s), "spec.json"), "w") as f:
      json.dump({"name": s.name, "warm_start_sha256": w}, f)
  assert common.same_warm_start(str(tmp_path), specs) == {sha[:12]: ["r0"], "None": ["r1"]}


def test_a_run_locked_by_another_study_is_waited_for_then_reused(tmp_path, monkeypatch):
  import threading

  s = common.RunSpec("f_r0", "grpo", overrides=(("num_steps", 3),))
  path = common.run_dir(str(tmp_path), s)
  monkeypatch.setattr(common.subprocess, "call", lambda *a, **k: pytest.fail("ran twice"))
  done = []
  with common._locked(path):  # another study is running it
    t = threading.Thread(target=lambda: done.append(common.ensure_run(str(tmp_path), s, print)))
    t.start()
    t.join(0.5)
    assert t.is_alive() and not done
    _fake_run(path, 3)
  t.join(5)
  assert done == [path]


def test_a_run_on_another_warm_start_than_the_archived_runs_is_refused(tmp_path, monkeypatch):
  """The warm start trained in a fresh root must be the archived runs' (same sha256), else a new
  run would be paired with runs from another starting policy."""
  from entropy_rl import warmstart

  def run(weights):
    def call(cmd, **_):
      path = cmd[cmd.index("--workdir") + 1]
      warm = json.loads(cmd[cmd.index("--overrides") + 1])["warm_start.path"]
      os.makedirs(os.path.join(warm, warmstart.MODEL_DIR), exist_ok=True)
      with open(os.path.join(warm, warmstart.MODEL_DIR, "model.safetensors"), "wb") as f:
        f.write(weights)
      _fake_run(path, 3)
      return 0

    return call

  archive, log = str(tmp_path / "archive"), lambda _: None
  s0, s1, s2 = (
      common.RunSpec(f"f_r{i}", "grpo", overrides=(("num_steps", 3), ("seed", 0))) for i in range(3)
  )
  monkeypatch.setattr(common.subprocess, "call", run(b"weights"))
  common.ensure_run(str(tmp_path / "a"), s0, log=log, archive=archive)
  spec = json.load(open(os.path.join(archive, "f_r0", "spec.json")))
  assert spec["cpus"] == len(os.sched_getaffinity(0)) and spec["warm_start_sha256"]
  assert spec["machine"] == common.machine.cpu_kind() and spec["earlier_machine"] == []
  # A fresh root whose first launch trains the same warm start archives its run.
  common.ensure_run(str(tmp_path / "b"), s1, log=log, archive=archive)
  assert os.path.exists(os.path.join(archive, "f_r1"))
  # One that trains another is refused after the run (kept in its root, not archived) ...
  monkeypatch.setattr(common.subprocess, "call", run(b"other bits"))
  with pytest.raises(RuntimeError, match=r"f_r2: the warm start .* not the one the seed-0 runs"):
    common.ensure_run(str(tmp_path / "c"), s2, log=log, archive=archive)
  assert not os.path.exists(os.path.join(archive, "f_r2"))
  assert common.read_records(common.run_dir(str(tmp_path / "c"), s2))
  # ... and the next run on it is refused before it starts.
  monkeypatch.setattr(common.subprocess, "call", lambda *a, **k: pytest.fail("launched"))
  with pytest.raises(RuntimeError, match="retrain it as they did"):
    common.ensure_run(
        str(tmp_path / "c"), dataclasses.replace(s2, name="f_r3"), log=log, archive=archive
    )


def test_the_warm_start_is_archived_restored_and_checked_per_seed(tmp_path, monkeypatch):
  """The first archived run's warm start is archived; a fresh root (another machine, whose
  retrained warm start would differ) restores it. Runs pair within a seed, so another seed may
  start from another warm start."""
  from entropy_rl import warmstart

  trained = []

  def call(cmd, **_):
    warm = json.loads(cmd[cmd.index("--overrides") + 1])["warm_start.path"]
    if common.warm_start_sha256(warm) is None:  # what the trainer does: train it when absent
      os.makedirs(os.path.join(warm, warmstart.MODEL_DIR), exist_ok=True)
      with open(os.path.join(warm, warmstart.MODEL_DIR, "model.safetensors"), "wb") as f:
        f.write(b"bits of machine %d" % len(trained))
      trained.append(warm)
    _fake_run(cmd[cmd.index("--workdir") + 1], 3)
    return 0

  monkeypatch.setattr(common.subprocess, "call", call)
  archive, log = str(tmp_path / "archive"), lambda _: None
  spec = lambda name, seed: common.RunSpec(
      name, "grpo", overrides=(("num_steps", 3), ("seed", seed))
  )
  a0 = common.ensure_run(str(tmp_path / "a"), spec("g_s0", 0), log=log, archive=archive)
  warm_a = common.warm_dir(str(tmp_path / "a"), {"num_steps": 3})
  archived = os.path.join(archive, os.path.basename(warm_a))
  assert common.warm_start_sha256(archived) == common.warm_start_sha256(warm_a)
  # Another machine restores it rather than training its own, so its seed-0 run is paired.
  common.ensure_run(str(tmp_path / "b"), spec("c_s0", 0), log=log, archive=archive)
  assert len(trained) == 1 and os.path.isdir(os.path.join(archive, "c_s0"))
  (sha_b,) = common.same_warm_start(str(tmp_path / "b"), [spec("c_s0", 0)])
  assert [sha_b] == list(common.same_warm_start(str(tmp_path / "a"), [spec("g_s0", 0)]))
  # Archived seed-0 runs on a warm start that was lost: seed 1 may start from the archived one,
  # seed 0 may not.
  shutil.rmtree(archived)
  with open(os.path.join(archive, "c_s0", "spec.json")) as f:
    old = json.load(f)
  for name in ("g_s0", "c_s0"):
    with open(os.path.join(archive, name, "spec.json"), "w") as f:
      json.dump({**old, "name": name, "warm_start_sha256": "lost" * 16}, f)
  c1 = common.ensure_run(str(tmp_path / "c"), spec("g_s1", 1), log=log, archive=archive)
  assert len(trained) == 2 and os.path.isdir(os.path.join(archive, "g_s1"))
  with pytest.raises(RuntimeError, match="seed-0 runs"):
    common.ensure_run(str(tmp_path / "c"), spec("k_s0", 0), log=log, archive=archive)
  assert not os.path.isdir(os.path.join(archive, "k_s0"))
  assert common.read_records(c1) and common.read_records(a0)


def test_plot_groups_gives_each_of_eleven_arms_its_own_colour(tmp_path, monkeypatch):
  from matplotlib.colors import to_rgb

  figs = []
  monkeypatch.setattr(common, "save_figure", lambda fig, path: figs.append(fig) or path)
  groups = {f"arm{i}": [[{"step": t, "acc": i + t} for t in range(5)]] for i in range(11)}
  common.plot_groups(groups, ["acc"], str(tmp_path / "curves.png"))
  colors = {to_rgb(line.get_color()) for line in figs[0].axes[0].get_lines()}
  assert len(colors) == 11
  assert common.line_colors(3) == [to_rgb(f"C{i}") for i in range(3)]  # the default cycle
