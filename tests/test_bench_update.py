"""experiments/bench_update.py: FLOP accounting, the torch Clip-Cov loss, and a --tiny run."""

import importlib.util
import json
import math
import pathlib
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from entropy_rl import config_lib, losses, models

_PATH = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "bench_update.py"
_spec = importlib.util.spec_from_file_location("bench_update", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_full_model_size_and_flops():
  cfg = bench.FULL
  # embed + lm_head 2 * 8192 * 256; per layer q/k/v/o weights and biases, MLP, two norms;
  # final norm.
  per_layer = 256 * 256 + 256 + 2 * (256 * 128 + 128) + 256 * 256 + 3 * 256 * 1024 + 2 * 256
  assert bench.param_count(cfg) == 2 * 8192 * 256 + 6 * per_layer + 256 == 10_098_944
  assert bench.layer_matmul_params(cfg) == 983_040
  expected = (
      6 * 6 * 983_040 * 32 * 256  # layer matmuls over all 32 x 256 positions
      + 12 * 6 * 4 * 64 * 256 * 32 * 256  # QK^T and AV, full 256 x 256
      + 6 * 256 * 8192 * 32 * 192
  )  # unembedding of the 192 response positions
  assert bench.model_flops(cfg, 32, 256, 192) == expected


@pytest.mark.parametrize("cfg", [bench.TINY, bench.FULL])
def test_layer_matmul_params_are_the_layer_weights(cfg):
  shapes = jax.eval_shape(models.init_params, cfg, jax.random.key(0))
  weights = sum(
      x.size
      for p, x in jax.tree_util.tree_flatten_with_path(shapes["layers"])[0]
      if "norm" not in jax.tree_util.keystr(p) and "bias" not in jax.tree_util.keystr(p)
  )
  assert bench.layer_matmul_params(cfg) * cfg.num_layers == weights


def test_torch_clip_cov_loss_matches_ours():
  """Same selection scores: the same selected tokens, loss and gradient as losses.policy_loss."""
  cfg = config_lib.loss_config(bench.bench_config(bench.TINY).loss)
  rng = np.random.default_rng(0)
  b, t = 6, 20
  mask = (np.arange(t)[None] < rng.integers(5, t + 1, b)[:, None]).astype(np.float32)
  logp = (np.log(rng.uniform(0.01, 1.0, (b, t))) * 2).astype(np.float32)
  old_logp = ((logp + rng.normal(0, 0.3, (b, t))) * mask).astype(np.float32)
  adv = (rng.normal(size=(b, 1)) * 2 * mask).astype(np.float32)
  key = jax.random.key(3)

  def ours(lp):
    return losses.policy_loss(
        lp, jnp.asarray(old_logp), jnp.asarray(adv), jnp.asarray(mask), cfg, rng=key
    )

  (loss, metrics), grad = jax.jit(jax.value_and_grad(ours, has_aux=True))(jnp.asarray(logp))
  uniform = torch.from_numpy(np.array(jax.random.uniform(jax.random.fold_in(key, 0), (b, t))))
  lp_t = torch.from_numpy(logp).requires_grad_()
  loss_t, k = bench.clip_cov_loss(
      lp_t, torch.from_numpy(old_logp), torch.from_numpy(adv), torch.from_numpy(mask), cfg, uniform
  )
  loss_t.backward()
  assert 1 <= k == metrics["n_cov_selected"] < metrics["n_valid"] * metrics["cov_frac_in_band"]
  np.testing.assert_allclose(float(loss_t.detach()), float(loss), rtol=1e-6)
  np.testing.assert_allclose(lp_t.grad.numpy(), np.asarray(grad), rtol=1e-5, atol=1e-7)


def test_tiny_run(tmp_path, capsys):
  out = tmp_path / "bench.json"
  r = bench.main(["--tiny", "--out", str(out)])
  assert json.loads(out.read_text()) == json.loads(json.dumps(r))
  printed = capsys.readouterr().out
  assert "speedup (median of per-round torch/ours)" in printed and "| ours (jax jit) |" in printed
  assert printed.rstrip().splitlines()[-1 if r["machine"]["idle"] else -2].startswith("machine: ")
  assert ("WARNING: the machine was not idle" in printed) is not r["machine"]["idle"]
  sz = bench.SIZES["tiny"]
  b, s = sz["batch"], sz["prompt_len"] + sz["response_len"]
  flops = bench.model_flops(bench.TINY, b, s, sz["response_len"])
  assert r["model_flops_per_step"] == flops and r["tokens_per_step"] == b * s
  assert r["params"] == bench.param_count(bench.TINY)
  assert r["threads"]["torch"] == r["threads"]["cpus"]
  # Both frameworks took the same first step.
  c = r["check"]
  np.testing.assert_allclose(*c["loss"], rtol=1e-4)
  np.testing.assert_allclose(*c["grad_norm"], rtol=1e-4)
  assert c["n_cov_selected"][0] == c["n_cov_selected"][1] >= 1
  assert c["max_abs_param_diff_over_lr"] < 0.5
  rounds = r["rounds"]
  assert len(rounds) == sz["rounds"]
  mm = 2 * sz["matmul"] ** 3
  for x in rounds:
    assert x["speedup"] == pytest.approx(x["torch_s"] / x["ours_s"])
    assert x["matmul_fraction"] == pytest.approx((flops / x["ours_s"]) / (mm / x["matmul_s"]))
  assert r["speedup"] == pytest.approx(statistics.median(x["speedup"] for x in rounds))
  step_s = statistics.median(x["ours_s"] for x in rounds)
  assert r["ours"]["tokens_per_s"] == pytest.approx(b * s / step_s)
  assert r["ours"]["flops_per_s"] == pytest.approx(flops / step_s)
  assert r["targets_met"]["speedup>=1.5"] == (r["speedup"] >= 1.5)
  # Every layer weight's forward, input-gradient and weight-gradient dot over all B x S positions
  # is among the counted dots; the floor is their timed sum.
  fl = r["dot_floor"]
  assert fl["flops"] >= 6 * bench.TINY.num_layers * bench.layer_matmul_params(bench.TINY) * b * s
  assert fl["seconds"] > 0 and fl["dots"] >= 3 * 7 * bench.TINY.num_layers
  assert "dot floor (experiments/dot_floor.py)" in printed and fl["table"] in printed
  for v in (r["matmul_flops_per_s"], r["torch"]["tokens_per_s"], r["compile_s"]):
    assert v > 0 and math.isfinite(v)


def test_bad_rounds():
  with pytest.raises(ValueError, match="--rounds must be positive"):
    bench.parse_args(["--tiny", "--rounds", "0"])
