"""experiments/bench_packing.py: the long-tailed batch and a --tiny run of both updates."""

import json
import statistics

import numpy as np
import pytest

from experiments import bench_packing as bench
from experiments import bench_update


def test_long_tailed_batch_averages_a_third_of_the_budget_and_reaches_it():
  sz = bench.SIZES["full"]
  b = bench.long_tailed_batch(
      bench_update.FULL, sz["batch"], sz["prompt_len"], sz["response_len"], sz["group"]
  )
  lengths = b["response_mask"].sum(1)
  assert lengths.max() == sz["response_len"] and lengths.min() >= 4
  assert 0.2 < lengths.mean() / sz["response_len"] < 0.45
  p = sz["prompt_len"]
  np.testing.assert_array_equal(b["attn_mask"][:, p:], b["response_mask"])
  assert np.all((b["tokens"][:, p:] > 0) == (b["response_mask"] > 0))
  assert np.all(b["advantages"][b["response_mask"] == 0] == 0)


def test_tiny_run(tmp_path, capsys):
  out = tmp_path / "bench.json"
  r = bench.main(["--tiny", "--out", str(out)])
  assert json.loads(out.read_text()) == json.loads(json.dumps(r))
  printed = capsys.readouterr().out
  assert "speedup (median of per-round rows/packed)" in printed
  assert ("WARNING: the machine was not idle" in printed) is not r["machine"]["idle"]
  assert r["packed_tokens"] < r["row_tokens"] and r["real_tokens"] <= r["packed_tokens"]
  c = r["check"]
  np.testing.assert_allclose(*c["loss"], rtol=1e-5)
  np.testing.assert_allclose(*c["grad_norm"], rtol=1e-5)
  assert c["n_cov_selected"][0] == c["n_cov_selected"][1] >= 1
  assert c["max_abs_param_diff_over_lr"] < 0.05
  rounds = r["rounds"]
  assert len(rounds) == bench.SIZES["tiny"]["rounds"]
  for x in rounds:
    assert x["speedup"] == pytest.approx(x["rows_s"] / x["packed_s"])
  assert r["speedup"] == pytest.approx(statistics.median(x["speedup"] for x in rounds))


def test_bad_rounds():
  with pytest.raises(ValueError, match="--rounds must be positive"):
    bench.parse_args(["--tiny", "--rounds", "0"])
