"""Accelerator benchmark (issue 7): update-step MFU and decode memory bandwidth on one chip.

A randomly initialised Qwen2.5-0.5B-shaped policy (bf16 compute, float32 parameters):

- Update step at sequence length 2048: forward to the final hidden states, per-token log-probs and
  entropy through the fused vocabulary-chunked path, loss -mean(logp) - 1e-3 mean(H), backward,
  optax AdamW; jitted with the parameters and optimizer state donated. Model FLOPs per token follow
  PaLM (Chowdhery et al. 2022, app. B): 6 x (matmul parameters, unembedding included) +
  12 x layers x heads x head_dim x seq (attention, counted as if not causal); rematerialisation and
  the fused backward's recomputed logits are not counted. MFU is reported against the peak of a
  large bf16 matmul timed in the same run and against the nominal H100 SXM dense bf16 peak.
- Decode: one token for each of `decode_batch` sequences against a full KV cache of `seq`
  slots (bf16 parameters, the cache donated), `steps` tokens per jitted loop as in the sampler. Bandwidth = bytes read per step (all parameters +
  the whole K and V cache) / step time, compared with the copy bandwidth of a large array
  (bytes read + bytes written) / time.

  python -m experiments.bench_accelerator            # GPU/TPU, a few minutes
  python -m experiments.bench_accelerator --tiny     # the same code at tiny size, CPU, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from entropy_rl import models
from experiments import machine

try:
  from entropy_rl.stats import fused_logprobs_and_entropy
except ImportError:  # The plain path, for a checkout without the fused kernel.
  fused_logprobs_and_entropy = None

NOMINAL_H100_BF16_FLOPS = 989e12  # H100 SXM, dense bf16 tensor cores.

QWEN2_5_0_5B = models.ModelConfig(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_layers=24,
    num_heads=14,
    num_kv_heads=2,
    head_dim=64,
    model_type="qwen2",
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    dtype="bfloat16",
    param_dtype="float32",
    remat=True,
)
TINY = dataclasses.replace(
    QWEN2_5_0_5B,
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tiny", action="store_true", help="tiny model and sizes (CPU, seconds)")
  p.add_argument("--seq", type=int, default=None, help="sequence length (2048)")
  p.add_argument("--batch", type=int, default=None, help="update-step sequences (8)")
  p.add_argument("--decode_batch", type=int, default=None, help="decode sequences (64)")
  p.add_argument("--steps", type=int, default=None, help="timed update and decode steps (10)")
  p.add_argument("--no_remat", action="store_true", help="keep all activations (more memory)")
  p.add_argument("--chunk_size", type=int, default=16384, help="fused vocabulary chunk")
  p.add_argument("--out", default="", help="also write the results as JSON here")
  args = p.parse_args(argv)
  defaults = (
      dict(seq=32, batch=2, decode_batch=2, steps=2, matmul=256, copy_mib=4)
      if args.tiny
      else dict(seq=2048, batch=8, decode_batch=64, steps=10, matmul=8192, copy_mib=4096)
  )
  for k, v in defaults.items():
    if getattr(args, k, None) is None:
      setattr(args, k, v)
  for k in ("seq", "batch", "decode_batch", "steps"):
    if getattr(args, k) < 1:
      raise ValueError(f"--{k} must be positive, got {getattr(args, k)}")
  if args.seq < 2:
    raise ValueError(f"--seq must be at least 2, got {args.seq}")
  return args


def _timed(fn, carry, steps: int, warmup: int = 1):
  """Seconds per call of carry = fn(carry), after `warmup` calls (compilation included there)."""
  for _ in range(warmup):
    carry = fn(carry)
  jax.block_until_ready(carry)
  t0 = time.perf_counter()
  for _ in range(steps):
    carry = fn(carry)
  jax.block_until_ready(carry)
  return (time.perf_counter() - t0) / steps, carry


def matmul_peak(n: int, steps: int) -> float:
  """FLOP/s of an n x n x n bf16 matmul (float32 accumulation, bf16 output)."""
  ka, kb = jax.random.split(jax.random.key(1))
  a = jax.random.normal(ka, (n, n), jnp.bfloat16)
  b = (jax.random.normal(kb, (n, n), jnp.float32) / np.sqrt(n)).astype(jnp.bfloat16)
  # The product feeds the next call, so no call can be skipped or reordered.
  f = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype))
  seconds, _ = _timed(lambda x: f(x, b), a, steps=max(steps, 10))
  return 2 * n**3 / seconds


def copy_bandwidth(mib: int, steps: int) -> float:
  """Bytes/s of y = x + 1 over a large bf16 array: bytes read + bytes written."""
  x = jnp.zeros((mib * 2**20 // 2,), jnp.bfloat16)
  seconds, _ = _timed(jax.jit(lambda v: v + 1), x, steps=max(steps, 10))
  return 2 * x.nbytes / seconds


def matmul_params(cfg: models.ModelConfig) -> int:
  """Parameters used in matmuls: attention, MLP and the unembedding (not norms, biases, lookup)."""
  d, f, n, k, h = (
      cfg.hidden_size,
      cfg.intermediate_size,
      cfg.num_heads,
      cfg.num_kv_heads,
      cfg.head_dim,
  )
  per_layer = d * (n + 2 * k) * h + n * h * d + 3 * d * f
  return cfg.num_layers * per_layer + d * cfg.vocab_size


def train_flops_per_token(cfg: models.ModelConfig, seq: int) -> float:
  """PaLM's model FLOPs per trained token: 6 N + 12 L H Q T."""
  return 6 * matmul_params(cfg) + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq


def _logprobs_and_entropy(hidden_BxTxD, unembed_DxV, targets_BxT, chunk_size):
  if fused_logprobs_and_entropy is not None:
    return fused_logprobs_and_entropy(hidden_BxTxD, unembed_DxV, targets_BxT, chunk_size=chunk_size)
  logits = jnp.einsum("btd,dv->btv", hidden_BxTxD, unembed_DxV, preferred_element_type=jnp.float32)
  logp_all = jax.nn.log_softmax(logits, axis=-1)
  logp = jnp.take_along_axis(logp_all, targets_BxT[..., None], axis=-1)[..., 0]
  return logp, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)


def update_benchmark(
    cfg: models.ModelConfig, batch: int, seq: int, steps: int, chunk_size: int
) -> dict:
  """Seconds per jitted update step (forward, fused log-probs/entropy, backward, AdamW)."""
  model = models.Decoder(cfg)
  params = models.init_params(cfg, jax.random.key(0))
  optimizer = optax.adamw(1e-5, weight_decay=0.01)
  opt_state = optimizer.init(params)
  tokens_BxT = jax.random.randint(jax.random.key(2), (batch, seq), 0, cfg.vocab_size)
  # Token t predicts token t+1; the last position has no target.
  targets_BxT = jnp.roll(tokens_BxT, -1, axis=1)
  mask_BxT = jnp.ones((batch, seq), jnp.float32).at[:, -1].set(0.0)

  def loss_fn(p, tokens_BxT, targets_BxT, mask_BxT):
    hidden_BxTxD = model.apply({"params": p}, tokens_BxT, return_hidden=True)
    unembed_DxV = models.unembedding(p, cfg).astype(cfg.jnp_dtype)
    logp_BxT, entropy_BxT = _logprobs_and_entropy(
        hidden_BxTxD, unembed_DxV, targets_BxT, chunk_size
    )
    n = jnp.sum(mask_BxT)
    return -jnp.sum(logp_BxT * mask_BxT) / n - 1e-3 * jnp.sum(entropy_BxT * mask_BxT) / n

  def update(carry, *batch_arrays):
    p, s, _ = carry
    loss, grads = jax.value_and_grad(loss_fn)(p, *batch_arrays)
    updates, s = optimizer.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  update = jax.jit(update, donate_argnums=0)
  t0 = time.perf_counter()
  seconds, (_, _, loss) = _timed(
      lambda c: update(c, tokens_BxT, targets_BxT, mask_BxT),
      (params, opt_state, jnp.zeros((), jnp.float32)),
      steps,
  )
  total = time.perf_counter() - t0
  flops = train_flops_per_token(cfg, seq) * batch * seq
  return dict(
      step_s=seconds,
      tokens_per_s=batch * seq / seconds,
      model_flops_per_step=flops,
      achieved_flops=flops / seconds,
      loss=float(loss),
      compile_and_first_step_s=total - seconds * steps,
  )


def decode_benchmark(cfg: models.ModelConfig, batch: int, cache_len: int, steps: int) -> dict:
  """Seconds per one-token decode step of `batch` sequences against a full `cache_len` cache,
  `steps` steps per jitted `fori_loop` as the sampler's `while_loop` runs them."""
  cfg = dataclasses.replace(cfg, param_dtype=cfg.dtype, remat=False)
  model = models.Decoder(cfg)
  params = models.init_params(cfg, jax.random.key(0))
  cache = models.init_cache(cfg, batch, cache_len)
  # Every slot but the last `steps + 1` holds a (random) earlier token, as late in a response.
  start = max(cache_len - steps - 1, 0)
  keys = jax.random.split(jax.random.key(3), 2 * cfg.num_layers)
  fill = lambda c, ks: tuple(jax.random.normal(k, x.shape, x.dtype) for x, k in zip(c, ks))
  cache = dict(
      cache,
      k=fill(cache["k"], keys[::2]),
      v=fill(cache["v"], keys[1::2]),
      mask=cache["mask"].at[:, :start].set(1),
  )
  tokens_Bx1 = jnp.zeros((batch, 1), jnp.int32)

  def one_token(_, carry, p):
    c, tok = carry
    logits_Bx1xV, c = model.apply({"params": p}, tok, c, method=models.Decoder.decode)
    return c, jnp.argmax(logits_Bx1xV, axis=-1).astype(jnp.int32)

  @functools.partial(jax.jit, donate_argnums=0)
  def decode_steps(carry, p):
    c, tok = carry  # Each call decodes slots start .. start + steps - 1 again.
    carry = (dict(c, index=jnp.asarray(start, jnp.int32)), tok)
    p = models.unstack_layers(p)  # as the sampler does, once before its loop
    return jax.lax.fori_loop(0, steps, functools.partial(one_token, p=p), carry)

  seconds, _ = _timed(lambda carry: decode_steps(carry, params), (cache, tokens_Bx1), 2)
  seconds /= steps
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  kv_bytes = sum(x.nbytes for x in cache["k"] + cache["v"])
  return dict(
      step_s=seconds,
      tokens_per_s=batch / seconds,
      param_bytes=param_bytes,
      kv_bytes=kv_bytes,
      bandwidth=(param_bytes + kv_bytes) / seconds,
  )


def run(args) -> dict:
  cfg = TINY if args.tiny else QWEN2_5_0_5B
  if args.no_remat:
    cfg = dataclasses.replace(cfg, remat=False)
  device = jax.devices()[0]
  peak = matmul_peak(args.matmul, args.steps)
  copy = copy_bandwidth(args.copy_mib, args.steps)
  upd = update_benchmark(cfg, args.batch, args.seq, args.steps, args.chunk_size)
  # Decode runs steps + 1 tokens (one warm-up) into the last free slots of the cache.
  dec = decode_benchmark(cfg, args.decode_batch, args.seq, args.steps)
  return dict(
      device=f"{device.platform}:{device.device_kind}",
      jax=jax.__version__,
      model="tiny" if args.tiny else "Qwen2.5-0.5B-shaped (random)",
      params=sum(
          x.size
          for x in jax.tree.leaves(jax.eval_shape(models.init_params, cfg, jax.random.key(0)))
      ),
      seq=args.seq,
      batch=args.batch,
      decode_batch=args.decode_batch,
      remat=cfg.remat,
      fused_logprobs=fused_logprobs_and_entropy is not None,
      matmul_peak_flops=peak,
      copy_bandwidth=copy,
      update=upd,
      mfu_vs_measured_peak=upd["achieved_flops"] / peak,
      mfu_vs_nominal_h100=upd["achieved_flops"] / NOMINAL_H100_BF16_FLOPS,
      decode=dec,
      decode_bandwidth_vs_copy=dec["bandwidth"] / copy,
  )


def report(r: dict) -> str:
  u, d = r["update"], r["decode"]
  return "\n".join(
      [
          f"device {r['device']}  jax {r['jax']}  model {r['model']} ({r['params'] / 1e6:.1f}M "
          f"params)",
          f"measured bf16 matmul peak   {r['matmul_peak_flops'] / 1e12:8.1f} TFLOP/s",
          f"measured copy bandwidth     {r['copy_bandwidth'] / 1e9:8.1f} GB/s",
          f"update step (B={r['batch']}, T={r['seq']}, remat={r['remat']}, fused="
          f"{r['fused_logprobs']}): {u['step_s'] * 1e3:.1f} ms, {u['tokens_per_s']:.0f} tokens/s, "
          f"{u['achieved_flops'] / 1e12:.1f} TFLOP/s (compile + first step "
          f"{u['compile_and_first_step_s']:.1f} s, loss {u['loss']:.3f})",
          f"  MFU vs measured peak      {100 * r['mfu_vs_measured_peak']:8.1f} %",
          f"  MFU vs nominal H100 989   {100 * r['mfu_vs_nominal_h100']:8.1f} %",
          f"decode (B={r['decode_batch']}, cache {r['seq']}): {d['step_s'] * 1e3:.2f} ms/step, "
          f"{d['tokens_per_s']:.0f} tokens/s, params {d['param_bytes'] / 1e9:.2f} GB + KV "
          f"{d['kv_bytes'] / 1e9:.2f} GB per step",
          f"  decode bandwidth          {d['bandwidth'] / 1e9:8.1f} GB/s = "
          f"{100 * r['decode_bandwidth_vs_copy']:.1f} % of copy",
          machine.describe(r["machine"]),
      ]
  )


def main(argv=None) -> dict:
  args = parse_args(argv)
  m = machine.begin()
  results = run(args)
  results["machine"] = machine.end(m)
  print(report(results))
  print(json.dumps(results))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
