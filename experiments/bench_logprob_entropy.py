"""Benchmark: fused vs plain per-token log-prob + entropy, and the cost of token selections.

Part 1: `stats.fused_logprobs_and_entropy` (vocabulary-chunked scan, custom VJP) against
`stats.token_logprobs_and_entropy(hidden @ unembed, ...)`, forward and forward+backward (grads wrt
hidden and unembedding), at 2048 tokens, hidden 896, vocabulary 151,936 (Qwen2.5). Temporary memory
comes from the compiled executables' memory analysis; times are interleaved rounds and the ratio
is the median of per-round ratios (this machine's speed drifts).

Part 2: Clip-Cov, KL-Cov and top-entropy selections (`losses.select_tokens`) at 1,000,000 valid
tokens, against a plain log-prob+entropy pass over the same tokens at vocabulary 4096 (measured on
`--pass_tokens` tokens and scaled linearly: 1M x 4096 logits would be 16 GB).

  python -m experiments.bench_logprob_entropy [--rounds 3] [--chunk_size 4096]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from entropy_rl import config_lib, losses, stats
from experiments import machine

MIB = 2.0**20


def _seconds(fn, *args):
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def _compile(fn, *args):
  return jax.jit(fn).lower(*args).compile()


def bench_fused_vs_plain(args):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  h = jax.random.normal(k1, (1, args.tokens, args.hidden), jnp.float32)
  w = jax.random.normal(k2, (args.hidden, args.vocab), jnp.float32) * args.hidden**-0.5 * 4.0
  y = jax.random.randint(k3, (1, args.tokens), 0, args.vocab)

  def plain(h, w, y):
    return stats.token_logprobs_and_entropy(h @ w, y)

  def fused(h, w, y):
    return stats.fused_logprobs_and_entropy(h, w, y, chunk_size=args.chunk_size)

  def with_grad(fn):
    def loss(h, w, y):
      logp, entropy = fn(h, w, y)
      return jnp.sum(logp) + jnp.sum(entropy)

    return jax.value_and_grad(loss, argnums=(0, 1))

  compiled, temp = {}, {}
  for path, fn in (("plain", plain), ("fused", fused)):
    for kind, g in (("forward", fn), ("forward+backward", with_grad(fn))):
      compiled[kind, path] = _compile(g, h, w, y)
      temp[kind, path] = compiled[kind, path].memory_analysis().temp_size_in_bytes
      _seconds(compiled[kind, path], h, w, y)  # warm-up
  times = {key: [] for key in compiled}
  for _ in range(args.rounds):
    for key in compiled:
      times[key].append(_seconds(compiled[key], h, w, y))

  print(
      f"\n## Fused vs plain: {args.tokens} tokens, hidden {args.hidden}, vocab {args.vocab}, "
      f"chunk {args.chunk_size}, float32, {args.rounds} rounds"
  )
  print(
      "| pass | plain temp MiB | fused temp MiB | fused/plain memory | plain s | fused s "
      "| fused/plain time |"
  )
  print("|---|---|---|---|---|---|---|")
  for kind in ("forward", "forward+backward"):
    p, f = (kind, "plain"), (kind, "fused")
    ratios = [tf / tp for tf, tp in zip(times[f], times[p])]
    print(
        f"| {kind} | {temp[p] / MIB:.0f} | {temp[f] / MIB:.1f} | 1/{temp[p] / temp[f]:.0f} "
        f"| {statistics.median(times[p]):.2f} | {statistics.median(times[f]):.2f} "
        f"| {statistics.median(ratios):.2f}x |"
    )


def bench_selections(args):
  b, t = 1000, args.selection_tokens // 1000
  keys = jax.random.split(jax.random.key(1), 6)
  mask = jnp.ones((b, t), jnp.float32)
  logp = jnp.log(jax.random.uniform(keys[0], (b, t), minval=1e-3, maxval=1.0))
  old = logp + 0.05 * jax.random.normal(keys[1], (b, t))
  adv = jnp.repeat(1.5 * jax.random.normal(keys[2], (b, 1)), t, axis=1)
  entropy = jnp.abs(jax.random.normal(keys[3], (b, t)))
  rng = keys[4]

  rules = {
      "clip_cov (r=2e-4)": config_lib.LossConfig(name="clip_cov"),
      "kl_cov (kappa=2e-3)": config_lib.LossConfig(name="kl_cov"),
      "top_entropy (rho=0.2)": config_lib.LossConfig(token_mask="top_entropy"),
  }
  compiled = {}
  for name, c in rules.items():
    compiled[name] = _compile(
        lambda lp, o, a, m, e, r, c=c: losses.select_tokens(lp, o, a, m, c, entropy_BxT=e, rng=r),
        logp,
        old,
        adv,
        mask,
        entropy,
        rng,
    )
    _seconds(compiled[name], logp, old, adv, mask, entropy, rng)

  m, v = args.pass_tokens, 4096
  logits = jax.random.normal(keys[5], (1, m, v)) * 3.0
  targets = jnp.zeros((1, m), jnp.int32)
  plain_pass = _compile(stats.token_logprobs_and_entropy, logits, targets)
  _seconds(plain_pass, logits, targets)
  scale = args.selection_tokens / m

  times = {name: [] for name in compiled}
  pass_times = []
  for _ in range(args.rounds):
    pass_times.append(_seconds(plain_pass, logits, targets) * scale)
    for name, fn in compiled.items():
      times[name].append(_seconds(fn, logp, old, adv, mask, entropy, rng))

  print(
      f"\n## Selections at {b * t:,} valid tokens vs a plain log-prob+entropy pass at vocab {v} "
      f"(measured on {m:,} tokens, x{scale:.1f}): {statistics.median(pass_times):.2f} s"
  )
  print("| selection | s | / plain pass |")
  print("|---|---|---|")
  for name, ts in times.items():
    ratios = [s / p for s, p in zip(ts, pass_times)]
    print(f"| {name} | {statistics.median(ts):.3f} | {100 * statistics.median(ratios):.1f}% |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokens", type=int, default=2048)
  parser.add_argument("--hidden", type=int, default=896)
  parser.add_argument("--vocab", type=int, default=151936)
  parser.add_argument("--chunk_size", type=int, default=4096)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--selection_tokens", type=int, default=1_000_000)
  parser.add_argument("--pass_tokens", type=int, default=32_768)
  parser.add_argument("--skip_fused", action="store_true")
  parser.add_argument("--skip_selections", action="store_true")
  args = parser.parse_args()
  m = machine.begin()
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}")
  if not args.skip_fused:
    bench_fused_vs_plain(args)
  if not args.skip_selections:
    bench_selections(args)
  print("\n" + machine.describe(machine.end(m)))


if __name__ == "__main__":
  main()
