import importlib.util
import json
import math
import pathlib

import jax
import pytest

from entropy_rl import models

_PATH = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "bench_accelerator.py"
_spec = importlib.util.spec_from_file_location("bench_accelerator", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _named_sizes(cfg):
  shapes = jax.eval_shape(models.init_params, cfg, jax.random.key(0))
  return {
      jax.tree_util.keystr(p): x.size for p, x in jax.tree_util.tree_flatten_with_path(shapes)[0]
  }


@pytest.mark.parametrize("cfg", [bench.TINY, bench.QWEN2_5_0_5B])
def test_matmul_params_are_the_weights_but_norms_and_biases(cfg):
  sizes = _named_sizes(cfg)
  weights = sum(n for name, n in sizes.items() if "norm" not in name and "bias" not in name)
  assert bench.matmul_params(cfg) == weights


def test_qwen2_5_0_5b_shape():
  assert sum(_named_sizes(bench.QWEN2_5_0_5B).values()) == 494_032_768  # Qwen2.5-0.5B.
  cfg = bench.TINY
  attn = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * 32
  assert bench.train_flops_per_token(cfg, 32) == 6 * bench.matmul_params(cfg) + attn


def test_tiny_run(tmp_path, capsys):
  out = tmp_path / "bench.json"
  r = bench.main(["--tiny", "--out", str(out)])
  assert json.loads(out.read_text()) == json.loads(json.dumps(r))
  printed = capsys.readouterr().out
  assert "MFU vs measured peak" in printed and "machine: " in printed
  assert r["machine"]["load_after"] and r["machine"]["idle"] == (r["machine"]["warning"] is None)
  cfg, u, d = bench.TINY, r["update"], r["decode"]
  # Random init: near-uniform predictions, loss about log V (less 1e-3 of the entropy).
  assert abs(u["loss"] - 0.999 * math.log(cfg.vocab_size)) < 0.1
  assert u["model_flops_per_step"] == bench.train_flops_per_token(cfg, 32) * 2 * 32
  assert r["mfu_vs_measured_peak"] == pytest.approx(u["achieved_flops"] / r["matmul_peak_flops"])
  assert r["fused_logprobs"] and r["remat"]
  assert d["param_bytes"] == 2 * r["params"]  # bf16 for decoding.
  assert d["kv_bytes"] == 2 * 2 * cfg.num_layers * 2 * 32 * cfg.num_kv_heads * cfg.head_dim
  for v in (r["matmul_peak_flops"], r["copy_bandwidth"], d["bandwidth"], u["tokens_per_s"]):
    assert v > 0 and math.isfinite(v)
  with pytest.raises(ValueError, match="--seq must be at least 2"):
    bench.parse_args(["--tiny", "--seq", "1"])
