"""policy.build_policy: the warm-start cache in `config.warm_start.path`."""

import json

import pytest

from entropy_rl import config_lib, policy, warmstart
from entropy_rl import data as data_lib


def test_shared_warm_start_trained_for_another_task_is_refused(tmp_path):
  c = config_lib.base_config()
  shared = tmp_path / "shared"
  shared.mkdir()
  (shared / warmstart.INFO_FILE).write_text(
      json.dumps({"settings": {"task": "Other()", "model": {}}})
  )
  c.warm_start.path = str(shared)
  with pytest.raises(config_lib.ConfigError, match="config.warm_start.path=.*another task"):
    policy.build_policy(c, str(tmp_path / "run"), data_lib.make_task(c.task))
  assert sorted(p.name for p in shared.iterdir()) == [warmstart.INFO_FILE]  # nothing retrained
