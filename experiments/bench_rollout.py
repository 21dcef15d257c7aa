"""Rollout throughput: the continuous-batching sampler vs the static one it replaced, CPU.

The static sampler (`entropy_rl/sampling.py` at commit STATIC_COMMIT, loaded from git) runs every
row until the longest one ends. Compared at equal KV memory: a cache of R x (P + L) slots, which
the continuous sampler uses as R slots refilled from the queue of N pairs, and the static one as
N / R waves of R rows (R / G prompts per call; each wave lasts as long as its longest row). The
static sampler holding all N rows at once (N / R times the KV memory) is listed for reference.

Lengths are forced by a bigram model we control: random ~1M-parameter Qwen2-shaped weights whose
embedding puts each token on one of three directions (family A, family B, the prompts' last token
"switch") 10x above the blocks' output, and whose unembedding reads only those directions. From
"switch" a response enters family B with probability 0.1 and family A otherwise; family A tokens
stop with probability HAZARD per token (99.5% stop within L/8), family B never stops, so about 90%
of rows stop within L/8 and the rest run to L. The blocks still compute everything (their weights
are ordinary runtime inputs). Uniform lengths: no stop id, every row runs to L.

Throughput is new tokens per second, the best of `--repeats` timed calls after a compiling one;
the 1-minute load average is printed with each number, since the machine may be shared.

  python -m experiments.bench_rollout [--repeats 2]
"""

import argparse
import os
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from entropy_rl import sampling
from entropy_rl.models import Decoder, ModelConfig, init_params
from experiments import machine

STATIC_COMMIT = "15874e0"  # the last static sampler
CONFIG = ModelConfig(
    vocab_size=2048,
    hidden_size=128,
    intermediate_size=512,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    model_type="qwen2",
)
PAD, STOP, SWITCH = 0, 1, 2
FAMILY_A, FAMILY_B = np.arange(3, 1026), np.arange(1026, CONFIG.vocab_size)
LONG_FRACTION, HAZARD = 0.1, 0.15
PROMPT_LEN, SAMPLES, NEW_TOKENS, ROWS = 32, 8, 256, 64
LONG_TAIL_PROMPTS, UNIFORM_PROMPTS = 128, 32  # N = 1,024 and 256 pairs


def load_static_sampler():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  source = subprocess.run(
      ["git", "-C", root, "show", f"{STATIC_COMMIT}:entropy_rl/sampling.py"],
      capture_output=True,
      text=True,
      check=True,
  ).stdout
  module = types.ModuleType("static_sampling")
  sys.modules[module.__name__] = module
  exec(compile(source, f"sampling.py@{STATIC_COMMIT}", "exec"), module.__dict__)
  return module


def bigram_params():
  """Random weights with the embedding and unembedding of the length-forcing bigram model."""
  params = init_params(CONFIG, jax.random.key(0))
  V, D = CONFIG.vocab_size, CONFIG.hidden_size
  family_V = np.full(V, 2)  # the direction of each token's embedding: 0 = A, 1 = B, 2 = switch
  family_V[FAMILY_A], family_V[FAMILY_B] = 0, 1
  embed_VxD = np.array(params["embed"])
  embed_VxD[np.arange(V), family_V] = 10.0
  # Next-token logits from each direction (the final norm scales a direction to about sqrt(D)).
  logits_3xV = np.full((3, V), -40.0)
  logits_3xV[0, FAMILY_A] = 0.0
  logits_3xV[0, STOP] = np.log(HAZARD / (1 - HAZARD) * len(FAMILY_A))
  logits_3xV[1, FAMILY_B] = 0.0
  logits_3xV[2, FAMILY_A] = 0.0
  logits_3xV[2, FAMILY_B] = np.log(
      LONG_FRACTION / (1 - LONG_FRACTION) * len(FAMILY_A) / len(FAMILY_B)
  )
  lm_head_DxV = np.zeros((D, V), np.float32)
  lm_head_DxV[:3] = logits_3xV / np.sqrt(D)
  return dict(params, embed=jnp.asarray(embed_VxD), lm_head=jnp.asarray(lm_head_DxV))


def prompts(num_prompts):
  rng = np.random.default_rng(num_prompts)
  prompt_BxP = rng.choice(FAMILY_A, (num_prompts, PROMPT_LEN))
  prompt_BxP[:, -1] = SWITCH
  return prompt_BxP.astype(np.int32), np.ones_like(prompt_BxP, np.int32)


def timed(run, repeats):
  """(best seconds, generated-token mask of the last call, load average before, after)."""
  jax.block_until_ready(run(0))  # compiles
  load_before = os.getloadavg()[0]
  times = []
  for i in range(repeats):
    start = time.perf_counter()
    mask_NxL = jax.block_until_ready(run(i + 1))
    times.append(time.perf_counter() - start)
  return min(times), np.asarray(mask_NxL), load_before, os.getloadavg()[0]


def measure(name, sampler, params, num_prompts, stop_ids, rows, repeats):
  """Times one sampler; `rows` is the rows per call (static: prompts per call = rows / G) or the
  rows in flight (continuous)."""
  prompt_BxP, mask_BxP = prompts(num_prompts)
  kwargs = dict(num_samples=SAMPLES, max_new_tokens=NEW_TOKENS, stop_ids=stop_ids, pad_id=PAD)
  model = Decoder(CONFIG)

  def run(seed):
    key = jax.random.key(seed)
    if sampler is sampling:
      return sampler.sample(
          model, params, prompt_BxP, mask_BxP, key, max_rows_in_flight=rows, **kwargs
      ).mask_NxL
    per_call = rows // SAMPLES
    return jnp.concatenate(
        [
            sampler.sample(
                model,
                params,
                prompt_BxP[i : i + per_call],
                mask_BxP[i : i + per_call],
                jax.random.fold_in(key, i),
                **kwargs,
            ).mask_NxL
            for i in range(0, num_prompts, per_call)
        ]
    )

  seconds, mask_NxL, load_before, load_after = timed(run, repeats)
  lengths_N = mask_NxL.sum(1)
  row = dict(
      name=name,
      seconds=seconds,
      tokens=int(lengths_N.sum()),
      kv_rows=rows,
      tokens_per_s=lengths_N.sum() / seconds,
      load=(load_before, load_after),
      within_l8=np.mean(lengths_N <= NEW_TOKENS // 8),
      at_l=np.mean(lengths_N == NEW_TOKENS),
  )
  print(
      f"| {name} | {rows} x {PROMPT_LEN + NEW_TOKENS} | {seconds:.2f} | {row['tokens']:,} | "
      f"{row['tokens_per_s']:,.0f} | {row['within_l8']:.3f} / {row['at_l']:.3f} | "
      f"{load_before:.2f} / {load_after:.2f} |",
      flush=True,
  )
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()
  m = machine.begin()
  static = load_static_sampler()
  params = bigram_params()
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(
      f"model: Qwen2-shaped bigram, {n_params / 1e6:.2f}M params; prompts {PROMPT_LEN} tokens, "
      f"G = {SAMPLES}, L = {NEW_TOKENS}, R = {ROWS}; jax {jax.__version__} "
      f"({jax.devices()[0].platform}, {os.cpu_count()} CPUs); static sampler from "
      f"{STATIC_COMMIT}"
  )
  print(
      "| run | KV slots | seconds | new tokens | new tokens/s | rows <= L/8 / at L | "
      "load avg before / after |"
  )
  print("|---|---|---|---|---|---|---|")
  r = {}
  n_long, n_uniform = LONG_TAIL_PROMPTS * SAMPLES, UNIFORM_PROMPTS * SAMPLES
  for key, name, sampler, num_prompts, stop_ids, rows in [
      (
          "long_static",
          "long tail, static, waves of R rows",
          static,
          LONG_TAIL_PROMPTS,
          (STOP,),
          ROWS,
      ),
      ("long_cont", "long tail, continuous, R slots", sampling, LONG_TAIL_PROMPTS, (STOP,), ROWS),
      (
          "long_static_all",
          "long tail, static, all N rows",
          static,
          LONG_TAIL_PROMPTS,
          (STOP,),
          n_long,
      ),
      ("uni_static", "uniform, static, waves of R rows", static, UNIFORM_PROMPTS, (), ROWS),
      ("uni_cont", "uniform, continuous, R slots", sampling, UNIFORM_PROMPTS, (), ROWS),
      ("uni_static_all", "uniform, static, all N rows", static, UNIFORM_PROMPTS, (), n_uniform),
      ("uni_cont_all", "uniform, continuous, all N rows", sampling, UNIFORM_PROMPTS, (), n_uniform),
  ]:
    r[key] = measure(name, sampler, params, num_prompts, stop_ids, rows, args.repeats)

  def ratio(a, b):
    return r[a]["tokens_per_s"] / r[b]["tokens_per_s"]

  print(
      f"long tail, equal KV (R = {ROWS} rows): continuous / static = "
      f"{ratio('long_cont', 'long_static'):.2f}x; continuous (R rows) / static with all "
      f"{n_long} rows ({n_long // ROWS}x the KV) = {ratio('long_cont', 'long_static_all'):.2f}x"
  )
  print(
      f"uniform, equal KV (R = {ROWS} rows): continuous / static = "
      f"{ratio('uni_cont', 'uni_static'):.2f}x; all {n_uniform} rows: continuous / static = "
      f"{ratio('uni_cont_all', 'uni_static_all'):.2f}x"
  )
  print(machine.describe(machine.end(m)))


if __name__ == "__main__":
  main()
