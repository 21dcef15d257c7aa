"""The study runner's bookkeeping: the code stamp of each run and the config it launches."""

import json
import os
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
  common.ensure_run(str(tmp_path), s, log=lambda _: None)
  assert common.same_code(str(tmp_path), [s]) == {"old then new": ["r0"]}


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
