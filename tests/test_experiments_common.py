"""The study runner's bookkeeping: the code stamp of each run and the config it launches."""

import json
import os
import re

import pytest

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


def test_load_config_applies_overrides_and_refuses_unknown_keys():
  c = common.load_config("grpo", "tiny", {"rollout.num_samples": 4})
  assert c.rollout.num_samples == 4
  with pytest.raises(KeyError):
    common.load_config("grpo", "tiny", {"rollout.num_sample": 4})
