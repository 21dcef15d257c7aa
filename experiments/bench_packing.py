"""Benchmark (issue 15): the update with and without sequence packing on long-tailed responses.

The model, loss and optimizer of `bench_update` (its ~10M-parameter Qwen2, Clip-Cov, AdamW, one
mini- and micro-batch), on a batch whose responses average a third of the 192-token budget and
one of which reaches it, so trimming the shared padding (`rl.length_bucket`) saves nothing. The
rows are packed by `entropy_rl.packing` into bins of the full row length. Both updates start from
the same state; a first step checks they agree (loss, gradient norm, selected tokens, parameters),
then interleaved rounds time them.

  python -m experiments.bench_packing           # minutes
  python -m experiments.bench_packing --tiny    # the same code at tiny size, seconds
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from entropy_rl import config_lib, models, packing, sharding
from entropy_rl import step as step_lib
from experiments import bench_update, machine

SIZES = {
    "full": dict(batch=32, prompt_len=64, response_len=192, group=8, rounds=5),
    "tiny": dict(batch=8, prompt_len=4, response_len=24, group=4, rounds=2),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tiny", action="store_true", help="tiny model and batch (seconds)")
  p.add_argument("--rounds", type=int, default=None, help="timed rounds (full 5, tiny 2)")
  p.add_argument("--out", default="", help="also write the results as JSON here")
  args = p.parse_args(argv)
  if args.rounds is not None and args.rounds < 1:
    raise ValueError(f"--rounds must be positive, got {args.rounds}")
  return args


def long_tailed_batch(cfg, batch, prompt_len, response_len, group, seed=0) -> dict:
  """`bench_update.make_batch`'s rows with response lengths drawn exponentially around a third of
  the budget (at least 4 tokens); the first row's response takes the whole budget."""
  b = bench_update.make_batch(cfg, batch, prompt_len, response_len, group, seed)
  rng = np.random.default_rng(seed + 1)
  rlen = np.clip(rng.exponential(response_len / 3, batch), 4, response_len).astype(int)
  rlen[0] = response_len
  rmask = (np.arange(response_len)[None] < rlen[:, None]).astype(np.int32)
  b["tokens"][:, prompt_len:] = np.where(rmask > 0, b["tokens"][:, prompt_len:] + 1, 0)
  b["tokens"] = np.minimum(b["tokens"], cfg.vocab_size - 1)
  b["attn_mask"][:, prompt_len:] = rmask
  b["response_mask"] = rmask.astype(np.float32)
  b["advantages"] = (b["advantages"][:, :1] * rmask).astype(np.float32)
  return b


def _timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return time.perf_counter() - t0, out


def run(args) -> dict:
  size = "tiny" if args.tiny else "full"
  cfg, sz = (bench_update.TINY if args.tiny else bench_update.FULL), SIZES[size]
  rounds = args.rounds or sz["rounds"]
  config = bench_update.bench_config(cfg)
  B, P, L = sz["batch"], sz["prompt_len"], sz["response_len"]

  params = jax.jit(models.init_params, static_argnums=0)(cfg, jax.random.key(0))
  params["lm_head"] = params["lm_head"] * jnp.float32(bench_update.UNEMBED_SCALE)
  batch = long_tailed_batch(cfg, B, P, L, sz["group"])
  noise = np.random.default_rng(1).normal(0.0, bench_update.OLD_LOGP_NOISE, (B, L))
  batch["old_logp"] = (
      (np.log(np.random.default_rng(2).uniform(0.05, 0.9, (B, L))) + noise) * batch["response_mask"]
  ).astype(np.float32)
  rows = step_lib.Batch(**batch)
  packed = rows.replace(packed=packing.pack(rows.tokens, rows.attn_mask, L, groups=1, shards=1))

  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  rules = sharding.default_rules()
  run_cfg = config_lib.typed(config)
  optimizer = step_lib.make_optimizer(run_cfg.optim, 1000)
  schedule = step_lib.lr_schedule(run_cfg.optim, 1000)
  pshard = sharding.logical_to_mesh_sharding(models.param_logical_axes(cfg), mesh, rules, params)
  params = jax.device_put(params, pshard)
  updates, states, compile_s = {}, {}, {}
  for name, b in (("rows", rows), ("packed", packed)):
    state, shardings = step_lib.init_state(
        jax.tree.map(jnp.copy, params), optimizer, run_cfg.update.loss, mesh, pshard
    )
    update = step_lib.make_update(
        models.Decoder(cfg), cfg, run_cfg.update, optimizer, schedule, mesh, shardings, rules
    )
    gb = jax.device_put(b, sharding.batch_sharding(mesh))
    compile_s[name], compiled = _timed(
        lambda u=update, s=state, g=gb: u.lower(s, g, jax.random.key(0)).compile()
    )
    updates[name] = (compiled, gb)
    states[name] = state

  first = {}
  for name, (fn, gb) in updates.items():
    states[name], m = jax.block_until_ready(fn(states[name], gb, jax.random.key(0)))
    first[name] = {k: float(m[k]) for k in ("loss", "grad_norm", "n_cov_selected")}
  diff = max(
      float(jnp.max(jnp.abs(a - b)))
      for a, b in zip(
          jax.tree.leaves(states["rows"].params), jax.tree.leaves(states["packed"].params)
      )
  )
  check = {k: [first["rows"][k], first["packed"][k]] for k in first["rows"]}
  check["max_abs_param_diff_over_lr"] = diff / config.optim.lr

  per_round = []
  for i in range(1, rounds + 1):
    r = {}
    key = jax.random.key(i)
    for name, (fn, gb) in updates.items():
      r[f"{name}_s"], (states[name], _) = _timed(
          lambda f=fn, s=states[name], g=gb, k=key: jax.block_until_ready(f(s, g, k))
      )
    r["speedup"] = r["rows_s"] / r["packed_s"]
    per_round.append(r)
  med = lambda k: statistics.median(r[k] for r in per_round)
  S = P + L
  return {
      "size": size,
      "params": bench_update.param_count(cfg),
      "batch": B,
      "prompt_len": P,
      "response_len": L,
      "row_tokens": B * S,
      "packed_tokens": int(np.prod(packed.packed.tokens.shape)),
      "bins": int(packed.packed.tokens.shape[0]),
      "real_tokens": int(rows.attn_mask.sum()),
      "response_tokens": int(rows.response_mask.sum()),
      "longest_response": int(rows.response_mask.sum(1).max()),
      "compile_s": compile_s,
      "check": check,
      "rounds": per_round,
      "rows_step_s": med("rows_s"),
      "packed_step_s": med("packed_s"),
      "speedup": med("speedup"),
  }


def format_table(r: dict) -> str:
  lines = [
      f"{r['params']:,}-parameter Qwen2 (bench_update's), batch {r['batch']} x ({r['prompt_len']} "
      f"prompt + {r['response_len']} response): {r['row_tokens']} row tokens, {r['real_tokens']} "
      f"real ({r['response_tokens']} response, longest response {r['longest_response']}); packed "
      f"into {r['bins']} bins = {r['packed_tokens']} tokens",
      "check after one step from the same state (rows, packed): "
      + "; ".join(
          f"{k} {v[0]:.6g}, {v[1]:.6g}" for k, v in r["check"].items() if isinstance(v, list)
      )
      + f"; max |params diff| / lr {r['check']['max_abs_param_diff_over_lr']:.2g}",
      f"compile s: rows {r['compile_s']['rows']:.1f}, packed {r['compile_s']['packed']:.1f}",
      "",
      "| round | rows s | packed s | rows/packed |",
      "|---|---|---|---|",
  ]
  for i, x in enumerate(r["rounds"], 1):
    lines.append(f"| {i} | {x['rows_s']:.3f} | {x['packed_s']:.3f} | {x['speedup']:.2f} |")
  lines += [
      "",
      f"median step: rows {r['rows_step_s']:.3f} s, packed {r['packed_step_s']:.3f} s; speedup "
      f"(median of per-round rows/packed) {r['speedup']:.2f}x",
      machine.describe(r["machine"]),
  ]
  return "\n".join(lines)


def main(argv=None) -> dict:
  return machine.measure(run, format_table, parse_args(argv))


if __name__ == "__main__":
  main()
