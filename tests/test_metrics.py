import glob
import json
import math
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from entropy_rl import metrics


def _events(tb_dir):
  """All events of the TFRecord event files in tb_dir, file by file in name order."""
  out = []
  for path in sorted(glob.glob(os.path.join(tb_dir, "events.*"))):
    data = open(path, "rb").read()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i : i + 8])
      out.append(event_pb2.Event.FromString(data[i + 12 : i + 12 + n]))
      i += 12 + n + 4
  return out


def _scalars(tb_dir):
  return [(e.step, v.tag, v.simple_value) for e in _events(tb_dir) for v in e.summary.value]


def test_jsonl_and_tensorboard(tmp_path):
  w = metrics.MetricsWriter(str(tmp_path))
  w.write(
      1,
      {"reward/mean": jnp.float32(0.25), "n": np.int32(3), "scope": "global", "loss": float("nan")},
  )
  w.write(2, {"reward/mean": 0.5, "ok": np.bool_(True)})
  w.close()
  lines = open(tmp_path / "metrics.jsonl").read().splitlines()
  assert json.loads(lines[0])["n"] == 3 and json.loads(lines[0])["scope"] == "global"
  assert json.loads(lines[1]) == {"step": 2, "reward/mean": 0.5, "ok": True}
  recs = metrics.read_metrics(tmp_path / "metrics.jsonl")
  assert math.isnan(recs[0]["loss"])
  got = _scalars(tmp_path / "tb")
  assert (1, "reward/mean", 0.25) in got and (2, "reward/mean", 0.5) in got
  assert not any(tag == "scope" for _, tag, _ in got)
  with pytest.raises(ValueError, match="metric 'h' must be a scalar"):
    metrics.MetricsWriter(str(tmp_path / "x")).write(1, {"h": np.zeros(3)})


def test_resume_drops_later_steps_and_purges_tensorboard(tmp_path):
  with metrics.MetricsWriter(str(tmp_path)) as w:
    for step in range(1, 6):
      w.write(step, {"r": step})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "r": ')  # A write cut off by the kill.
  with metrics.MetricsWriter(str(tmp_path), first_step=4) as w:
    w.write(4, {"r": 40})
  recs = metrics.read_metrics(tmp_path / "metrics.jsonl")
  assert [(r["step"], r["r"]) for r in recs] == [(1, 1), (2, 2), (3, 3), (4, 40)]
  starts = [e for e in _events(tmp_path / "tb") if e.HasField("session_log")]
  assert starts and starts[-1].step == 4
  assert starts[-1].session_log.status == event_pb2.SessionLog.START


def test_only_process_zero_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  with metrics.MetricsWriter(str(tmp_path / "w")) as w:
    w.write(1, {"r": 1.0})
  assert not os.path.exists(tmp_path / "w")
  bar = metrics.ProgressBar(total=3)
  bar.update(1, {"reward/mean": 1.0})
  bar.close()
  with metrics.MetricsWriter(str(tmp_path / "off"), enabled=False) as w:
    w.write(1, {"r": 1.0})
  assert not os.path.exists(tmp_path / "off")


def test_uri_workdir_uploads_and_resumes(tmp_path):
  uri = "file://" + str(tmp_path / "bucket" / "run")
  with metrics.MetricsWriter(uri) as w:
    w.write(1, {"r": 1.0})
    w.write(2, {"r": 2.0})
    assert w.local_dir != str(tmp_path / "bucket" / "run")
  remote = tmp_path / "bucket" / "run"
  assert [r["step"] for r in metrics.read_metrics(remote / "metrics.jsonl")] == [1, 2]
  assert glob.glob(str(remote / "tb" / "events.*"))
  with metrics.MetricsWriter(uri, first_step=2) as w:
    w.write(2, {"r": 20.0})
  assert [r["r"] for r in metrics.read_metrics(uri + "/metrics.jsonl")] == [1.0, 20.0]
  metrics.plot_metrics(uri + "/metrics.jsonl", ["r"], uri + "/plot.png")
  assert open(remote / "plot.png", "rb").read(4) == b"\x89PNG"


def test_progress_bar_shows_reward_and_entropy(tmp_path):
  bar = metrics.ProgressBar(total=10, initial=2)
  bar.update(3, {"reward/mean": 0.125, "entropy/token_mean": 0.5, "other": 1})
  assert bar._bar.n == 3
  shown = str(bar._bar)
  assert "reward=0.125" in shown and "entropy=0.5" in shown and "other" not in shown
  bar.close()


def test_plot_and_summary_table(tmp_path):
  path = tmp_path / "metrics.jsonl"
  with metrics.MetricsWriter(str(tmp_path)) as w:
    for step in range(1, 5):
      w.write(
          step,
          {
              "reward/mean": 0.1 * step,
              "entropy/token_mean": 1.0 / step,
              **({"eval/pass@1": 0.5} if step == 4 else {}),
          },
      )
  out = metrics.plot_metrics(path, ["reward/mean", "entropy/token_mean", "acc"], tmp_path / "p.png")
  assert open(out, "rb").read(4) == b"\x89PNG" and os.path.getsize(out) > 1000
  table = metrics.summary_table(
      metrics.read_metrics(path), ["reward/mean", "eval/pass@1", "acc"]
  ).splitlines()
  assert table[0] == "| metric | first | last | min | max | n |"
  assert table[2] == "| reward/mean | 0.1 | 0.4 | 0.1 | 0.4 | 4 |"
  assert table[3] == "| eval/pass@1 | 0.5 | 0.5 | 0.5 | 0.5 | 1 |"
  assert table[4] == "| acc | - | - | - | - | 0 |"
  with pytest.raises(ValueError, match="keys"):
    metrics.plot_metrics(path, [], tmp_path / "q.png")


def test_restart_from_scratch_replaces_every_row(tmp_path):
  with metrics.MetricsWriter(str(tmp_path)) as w:
    for step in range(3):
      w.write(step, {"r": step})
  with metrics.MetricsWriter(str(tmp_path), first_step=0) as w:
    w.write(0, {"r": 10})
    w.write(1, {"r": 11})
  recs = metrics.read_metrics(tmp_path / "metrics.jsonl")
  assert [(r["step"], r["r"]) for r in recs] == [(0, 10), (1, 11)]


def test_memory_uri_workdir_writes_nothing_locally(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  uri = "memory://bucket/metrics_run"
  with metrics.MetricsWriter(uri) as w:
    w.write(1, {"r": 1.0})
  metrics.plot_metrics(uri + "/metrics.jsonl", ["r"], uri + "/curves.png")
  assert [r["step"] for r in metrics.read_metrics(uri + "/metrics.jsonl")] == [1]
  assert os.listdir(tmp_path) == []
