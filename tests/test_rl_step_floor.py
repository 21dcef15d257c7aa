"""experiments/rl_step_floor.py: the programs of each step are recorded, their dots counted per
executed iteration, and the floor is timed."""

import json
import math

import pytest

from experiments import bench_rl_step, rl_step_floor


def test_smoke_floor(tmp_path, capsys):
  out = tmp_path / "r.json"
  r = rl_step_floor.main(["--smoke", "--packing", "--out", str(out)])
  assert json.loads(out.read_text()) == json.loads(json.dumps(r))
  assert r["steady_steps"] == 2 and r["packing"]
  model = bench_rl_step.SIZES["smoke"]["model"]
  assert 1 <= r["decode_iterations"] <= bench_rl_step.SIZES["smoke"]["max_new_tokens"]
  # A decode iteration on CPU: fused q/k/v, o, fused gate/up, down per layer, then the logits.
  per_iteration = 4 * model["num_layers"] + 1
  assert r["dots_per_step"]["decode"] == pytest.approx(r["decode_iterations"] * per_iteration)
  assert r["dots_per_step"]["update"] > 0 and r["dots_per_step"]["prefill"] > 0
  floors = r["floor_s"]
  assert all(math.isfinite(v) and v > 0 for v in floors.values()), floors
  assert r["step_floor_s"] == pytest.approx(sum(floors.values()))
  printed = capsys.readouterr().out
  assert "| step |" in printed and "machine: " in printed


def test_recording_restores_the_programs():
  from entropy_rl import sampling, step

  before = (step.make_update, sampling._prefill, sampling._decode)
  with rl_step_floor.recording() as calls:
    assert sampling._decode is not before[2] and set(calls) == set(rl_step_floor.PROGRAMS)
  assert (step.make_update, sampling._prefill, sampling._decode) == before


def test_steps_and_warmup_defaults_and_errors(capsys):
  a = rl_step_floor.parse_args([])
  assert (a.steps, a.warmup) == (8, 2)
  a = rl_step_floor.parse_args(["--smoke"])
  assert (a.steps, a.warmup) == (3, 1)
  for argv in (["--steps", "0"], ["--steps", "4", "--warmup", "4"], ["--warmup", "-1"]):
    with pytest.raises(SystemExit):
      rl_step_floor.parse_args(argv)
    assert "need 0 <= --warmup < --steps" in capsys.readouterr().err
