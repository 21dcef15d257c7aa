"""experiments/bench_rl_step.py: the benchmarked model and config, the steady-state summary, and a
--smoke run of both trainers (TRL's side skipped when trl is not installed)."""

import importlib.util
import json
import math
import pathlib

import jax
import pytest

from entropy_rl import config_lib, models, policy as policy_lib
from entropy_rl import data as data_lib

_PATH = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "bench_rl_step.py"
_spec = importlib.util.spec_from_file_location("bench_rl_step", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_full_config_is_the_issue_model_and_batch(tmp_path):
  c = bench.bench_config(bench.SIZES["full"], 10)
  config_lib.validate(c, 1)
  vocab = len(data_lib.build_tokenizer(str(tmp_path)))
  cfg = policy_lib.tiny_model_config(c.model, vocab)
  shapes = jax.eval_shape(models.init_params, cfg, jax.random.key(0))
  # 8 layers of q/k/v/o (with q/k/v biases), SwiGLU 256 -> 1024, two norms; final norm; tied embed.
  per_layer = (256 * 256 + 256) + 2 * (256 * 128 + 128) + 256 * 256 + 3 * 256 * 1024 + 2 * 256
  assert vocab == 23
  assert sum(x.size for x in jax.tree.leaves(shapes)) == 8 * per_layer + 256 + 23 * 256 == 7_878_656
  assert (
      cfg.hidden_size,
      cfg.num_layers,
      cfg.num_heads,
      cfg.num_kv_heads,
      cfg.intermediate_size,
  ) == (256, 8, 8, 4, 1024) and cfg.tie_word_embeddings
  assert (
      c.rollout.prompts_per_step,
      c.rollout.num_samples,
      c.rollout.max_new_tokens,
      c.rollout.temperature,
  ) == (8, 8, 64, 1.0)
  # One optimizer step per RL step; no warm start or evaluation.
  assert c.rl.num_minibatches == c.rl.num_microbatches == c.rl.ppo_epochs == 1
  assert not c.warm_start.enabled and c.eval_every == 0 and c.num_steps == 10
  assert not c.rl.packing and bench.bench_config(bench.SIZES["full"], 10, packing=True).rl.packing
  assert bench.parse_args(["--packing"]).packing and not bench.parse_args([]).packing


def test_steady_state_skips_the_warmup_steps():
  s = bench.steady([30.0, 2.0, 4.0], [50, 20, 40], warmup=1)
  assert s["steady_steps"] == 2 and s["tokens_per_s"] == 60 / 6
  assert s["mean_step_s"] == 3.0 and s["completion_tokens_per_step"] == 30.0
  assert s["step_s"] == [30.0, 2.0, 4.0]


def test_bad_warmup():
  with pytest.raises(ValueError, match="--warmup"):
    bench.parse_args(["--steps", "2", "--warmup", "2"])
  assert bench.parse_args(["--smoke"]).steps == 3


@pytest.mark.slow
def test_smoke_run(tmp_path, capsys):
  out = tmp_path / "r.json"
  r = bench.main(["--smoke", "--workdir", str(tmp_path / "w"), "--out", str(out)])
  assert json.loads(out.read_text()) == json.loads(json.dumps(r))
  printed = capsys.readouterr().out
  assert "| entropy_rl.trainer |" in printed and "machine: " in printed
  assert r["machine"]["load_after"] and r["max_abs_logit_diff"] < 1e-4
  size = bench.SIZES["smoke"]
  rows = size["prompts"] * size["samples"]
  sides = ["ours"] if importlib.util.find_spec("trl") is None else ["ours", "trl"]
  for side in sides:
    x = r[side]
    assert len(x["step_s"]) == len(x["completion_tokens"]) == 3 and x["steady_steps"] == 2
    assert all(rows <= n <= rows * size["max_new_tokens"] for n in x["completion_tokens"])
    assert x["tokens_per_s"] > 0 and math.isfinite(x["tokens_per_s"])
  if sides == ["ours"]:
    assert r["trl"] == {"skipped": bench.TRL_MISSING} and bench.TRL_MISSING in printed
    pytest.skip("trl is not installed: only our side ran")
  assert r["speedup"] == pytest.approx(r["ours"]["tokens_per_s"] / r["trl"]["tokens_per_s"])
  assert "speed-up (completion tokens/s, ours / TRL)" in printed
