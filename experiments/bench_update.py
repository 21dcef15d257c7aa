"""Benchmark (issue 5): the jitted RL update vs the same step in PyTorch eager, on CPU.

Ours: `entropy_rl.step.make_update` with the Clip-Cov config (configs/clip_cov.py) on a 1-device
mesh, one mini-batch and one micro-batch: forward to the final hidden states, fused vocabulary-
chunked log-probs and entropy (temperature 1), Clip-Cov loss (covariance, band, random selection,
PPO clip, token-mean), backward, global-norm clipping and AdamW, the state donated.

PyTorch: transformers' `Qwen2ForCausalLM` (SDPA attention, float32) loaded with `from_pretrained`
from our weights exported by `save_hf`, logits of the response positions only (`logits_to_keep`),
log-softmax, gathered log-probs and no-grad entropy, the same Clip-Cov loss written in torch
(`clip_cov_loss`), backward, `clip_grad_norm_` and `torch.optim.AdamW`, eager.

Both start from the same weights and batch; a first step on each is compared (loss, gradient norm,
selected tokens, parameters after the step, with torch given the selection scores our step draws).
Then interleaved rounds time ours, torch and a large float32 matmul of each framework; per-round
ratios are summarised by their median, since the machine is shared and its speed drifts.

Model FLOPs per step (`model_flops`), PaLM-style, counting only matmuls with parameters and
attention, the forward as 2 FLOPs per multiply-add and the backward as twice the forward:
  6 x P_layers x B x S                    (q, k, v, o, gate, up, down over every position)
+ 12 x layers x heads x head_dim x S x B x S   (QK^T and AV over the full S x S, as computed)
+ 6 x hidden x vocab x B x L              (unembedding of the L response positions)
Padding counts (it is computed); the fused backward's recomputed logits and norms do not.

  python -m experiments.bench_update           # ~10M parameters, 32 x 256 tokens, minutes
  python -m experiments.bench_update --tiny    # the same code at tiny size, seconds
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import safetensors.numpy  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from configs import clip_cov  # noqa: E402
from entropy_rl import advantages, config_lib, models, sharding, stats  # noqa: E402
from entropy_rl import step as step_lib  # noqa: E402
from entropy_rl.models import hf  # noqa: E402
from experiments import dot_floor, machine  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)

FULL = models.ModelConfig(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=1024,
    num_layers=6,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    model_type="qwen2",
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
TINY = models.ModelConfig(
    vocab_size=256,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    model_type="qwen2",
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
SIZES = {
    "full": dict(batch=32, prompt_len=64, response_len=192, group=8, rounds=5, matmul=2048),
    "tiny": dict(batch=8, prompt_len=4, response_len=12, group=4, rounds=2, matmul=128),
}
# The untied unembedding is scaled up so the random policy has logits of std ~2.5: log-probs then
# spread over nats, so covariances fall in the Clip-Cov band and some ratios get clipped.
UNEMBED_SCALE = 8.0
OLD_LOGP_NOISE = 0.3
LR = 1e-3
TARGET_SPEEDUP = 1.5  # issue 15: our update against PyTorch eager's


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tiny", action="store_true", help="tiny model and batch (seconds)")
  p.add_argument("--rounds", type=int, default=None, help="timed rounds (full 5, tiny 2)")
  p.add_argument("--out", default="", help="also write the results as JSON here")
  args = p.parse_args(argv)
  if args.rounds is not None and args.rounds < 1:
    raise ValueError(f"--rounds must be positive, got {args.rounds}")
  return args


def param_count(cfg: models.ModelConfig) -> int:
  shapes = jax.eval_shape(models.init_params, cfg, jax.random.key(0))
  return sum(x.size for x in jax.tree.leaves(shapes))


def layer_matmul_params(cfg: models.ModelConfig) -> int:
  """Weights of one layer's matmuls: q, k, v, o projections and the SwiGLU MLP."""
  d, f, n, k, h = (
      cfg.hidden_size,
      cfg.intermediate_size,
      cfg.num_heads,
      cfg.num_kv_heads,
      cfg.head_dim,
  )
  return d * (n + 2 * k) * h + n * h * d + 3 * d * f


def model_flops(cfg: models.ModelConfig, batch: int, seq: int, response_len: int) -> int:
  """Training FLOPs of one step (see the module docstring)."""
  layers = 6 * cfg.num_layers * layer_matmul_params(cfg) * batch * seq
  attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq * batch * seq
  unembed = 6 * cfg.hidden_size * cfg.vocab_size * batch * response_len
  return layers + attention + unembed


def bench_config(cfg: models.ModelConfig):
  """configs/clip_cov.py (tiny preset), one mini- and micro-batch."""
  c = clip_cov.get_config()
  c.rl.num_minibatches = c.rl.num_microbatches = c.rl.ppo_epochs = 1
  c.rl.recompute_old_logp = False
  c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = LR, 0, 0.0
  c.model.hidden_size, c.model.num_layers = cfg.hidden_size, cfg.num_layers
  return c


def make_batch(
    cfg: models.ModelConfig,
    batch: int,
    prompt_len: int,
    response_len: int,
    group: int,
    seed: int = 0,
) -> dict:
  """Left-padded prompts of P/2..P tokens, responses of L/2..L tokens, GRPO advantages of 0/1
  rewards in groups of `group`. `old_logp` is filled in later from the model."""
  rng = np.random.default_rng(seed)
  plen = rng.integers(prompt_len // 2, prompt_len + 1, batch)
  rlen = rng.integers(response_len // 2, response_len + 1, batch)
  pmask = (np.arange(prompt_len)[None] >= prompt_len - plen[:, None]).astype(np.int32)
  rmask = (np.arange(response_len)[None] < rlen[:, None]).astype(np.int32)
  tokens = rng.integers(1, cfg.vocab_size, (batch, prompt_len + response_len)).astype(np.int32)
  attn = np.concatenate([pmask, rmask], axis=1)
  tokens *= attn
  rewards = rng.integers(0, 2, (batch // group, group)).astype(np.float32)
  adv = np.asarray(jax.jit(advantages.grpo_advantages)(rewards)).reshape(batch)
  return {
      "tokens": tokens,
      "attn_mask": attn,
      "response_mask": rmask.astype(np.float32),
      "advantages": (adv[:, None] * rmask).astype(np.float32),
  }


def _masked_mean(x, valid):
  return torch.where(valid, x, 0.0).sum() / valid.sum().clamp(min=1)


def clip_cov_loss(logp, old_logp, adv, mask, loss_cfg, uniform):
  """Clip-Cov (EM Eq. 11-12) in torch, token-mean: a random max(floor(r n), 1) of the unclipped
  valid tokens with lb < cov < ub get loss x 0; `uniform` [B, L] scores pick them (highest first).

  Returns (loss, number of selected tokens)."""
  valid = mask > 0
  ratio = torch.exp(logp - old_logp)
  l1 = -adv * ratio
  l2 = -adv * ratio.clamp(1.0 - loss_cfg.clip_ratio_low, 1.0 + loss_cfg.clip_ratio_high)
  with torch.no_grad():
    lp = logp.detach()
    cov = (adv - _masked_mean(adv, valid)) * (lp - _masked_mean(lp, valid))
    cand = (
        valid
        & ~(l2.detach() > l1.detach())
        & (cov > loss_cfg.clip_cov_lb)
        & (cov < loss_cfg.clip_cov_ub)
    ).reshape(-1)
    k = min(int(stats.top_count(loss_cfg.clip_cov_ratio, int(valid.sum()))), int(cand.sum()))
    selected = torch.zeros(cand.shape, dtype=logp.dtype)
    selected[torch.topk(torch.where(cand, uniform.reshape(-1), -math.inf), k).indices] = 1.0
    selected = selected.reshape(logp.shape)
  loss_tok = torch.maximum(l1, l2) * (1.0 - selected)
  return torch.where(valid, loss_tok, 0.0).sum() / mask.sum(), k


def torch_forward(model, tb, temperature):
  """Response log-probs (with grad) and entropies (no grad), float32 [B, L]."""
  s, l = tb["tokens"].shape[1], tb["response_mask"].shape[1]
  logits = model(
      input_ids=tb["tokens"],
      attention_mask=tb["attn_mask"],
      position_ids=tb["positions"],
      use_cache=False,
      logits_to_keep=torch.arange(s - l - 1, s - 1),
  ).logits
  logits.div_(temperature)
  logp_all = torch.log_softmax(logits, dim=-1)
  logp = torch.gather(logp_all, -1, tb["tokens"][:, s - l :, None]).squeeze(-1)
  with torch.no_grad():
    entropy = -(logp_all.exp() * logp_all).sum(-1)
  return logp, entropy


def torch_step(model, opt, tb, config, uniform=None):
  """One update: forward, Clip-Cov loss, backward, clipping, AdamW (skipped if non-finite)."""
  logp, _ = torch_forward(model, tb, config.rollout.temperature)
  if uniform is None:
    uniform = torch.rand(logp.shape)
  loss, k = clip_cov_loss(
      logp, tb["old_logp"], tb["advantages"], tb["response_mask"], config.loss, uniform
  )
  opt.zero_grad(set_to_none=True)
  loss.backward()
  grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
  if torch.isfinite(grad_norm) and torch.isfinite(loss):
    opt.step()
  return {"loss": float(loss.detach()), "grad_norm": float(grad_norm), "n_cov_selected": k}


@functools.partial(jax.jit, static_argnums=1)
def jax_selection_uniform(rng, shape):
  """The Clip-Cov selection scores `step.update` draws for `rng` with one epoch, mini-batch and
  micro-batch (its key splits, then `losses.select_tokens`)."""
  key = jax.random.split(jax.random.fold_in(rng, 0), 1)[0]
  _, loss_key = jax.random.split(key)
  micro_key = jax.random.split(loss_key, 1)[0]
  return jax.random.uniform(jax.random.fold_in(micro_key, 0), shape)


def _hf_params(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return time.perf_counter() - t0, out


def _best_matmul(fn, reps=3):
  return min(_timed(fn)[0] for _ in range(reps))


def run(args) -> dict:
  size = "tiny" if args.tiny else "full"
  cfg, sz = (TINY if args.tiny else FULL), SIZES[size]
  rounds = args.rounds or sz["rounds"]
  threads = len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  transformers.utils.logging.disable_progress_bar()
  config = bench_config(cfg)
  B, P, L = sz["batch"], sz["prompt_len"], sz["response_len"]
  S = P + L

  # Same weights in both frameworks.
  params = jax.jit(models.init_params, static_argnums=0)(cfg, jax.random.key(0))
  params["lm_head"] = jnp.asarray(np.asarray(params["lm_head"]) * np.float32(UNEMBED_SCALE))
  with tempfile.TemporaryDirectory() as d:
    hf.save_hf(params, cfg, d)
    tmodel = transformers.Qwen2ForCausalLM.from_pretrained(
        d, dtype=torch.float32, attn_implementation="sdpa"
    )
  tmodel.train()

  batch = make_batch(cfg, B, P, L, sz["group"])
  positions = np.maximum(np.cumsum(batch["attn_mask"], axis=1) - 1, 0)
  tb = {k: torch.from_numpy(v) for k, v in batch.items()}
  tb["tokens"] = tb["tokens"].long()
  tb["positions"] = torch.from_numpy(positions).long()
  with torch.no_grad():
    logp0, _ = torch_forward(tmodel, tb, config.rollout.temperature)
  noise = np.random.default_rng(1).normal(0.0, OLD_LOGP_NOISE, (B, L)).astype(np.float32)
  batch["old_logp"] = ((logp0.numpy() + noise) * batch["response_mask"]).astype(np.float32)
  tb["old_logp"] = torch.from_numpy(batch["old_logp"])

  # Ours on a 1-device mesh.
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  rules = sharding.default_rules()
  run_cfg = config_lib.typed(config)
  optimizer = step_lib.make_optimizer(run_cfg.optim, 1000)
  schedule = step_lib.lr_schedule(run_cfg.optim, 1000)
  pshard = sharding.logical_to_mesh_sharding(models.param_logical_axes(cfg), mesh, rules, params)
  state, shardings = step_lib.init_state(
      jax.device_put(params, pshard), optimizer, run_cfg.update.loss, mesh, pshard
  )
  gbatch = jax.device_put(step_lib.Batch(**batch), sharding.batch_sharding(mesh))
  update = step_lib.make_update(
      models.Decoder(cfg), cfg, run_cfg.update, optimizer, schedule, mesh, shardings, rules
  )
  rng0 = jax.random.key(0)
  compile_s, update = _timed(lambda: update.lower(state, gbatch, rng0).compile())
  dots = dot_floor.module_dots(update.as_text())

  # First step of each from the same state, torch given our selection scores: the check.
  jax_first_s, (state, m) = _timed(lambda: jax.block_until_ready(update(state, gbatch, rng0)))
  topt = torch.optim.AdamW(
      tmodel.parameters(),
      lr=config.optim.lr,
      betas=(config.optim.b1, config.optim.b2),
      eps=1e-8,
      weight_decay=config.optim.weight_decay,
  )
  uniform0 = torch.from_numpy(np.array(jax_selection_uniform(rng0, (B, L))))
  torch_first_s, tm = _timed(lambda: torch_step(tmodel, topt, tb, config, uniform0))
  with tempfile.TemporaryDirectory() as d:
    hf.save_hf(jax.device_get(state.params), cfg, d)
    ours_hf = safetensors.numpy.load_file(os.path.join(d, hf.WEIGHTS_FILE))
  theirs = _hf_params(tmodel)
  check = {
      "loss": [float(m["loss"]), tm["loss"]],
      "grad_norm": [float(m["grad_norm"]), tm["grad_norm"]],
      "n_cov_selected": [float(m["n_cov_selected"]), float(tm["n_cov_selected"])],
      "max_abs_param_diff_over_lr": max(
          float(np.max(np.abs(ours_hf[k] - theirs[k]))) for k in ours_hf
      )
      / config.optim.lr,
  }

  # Timed rounds, interleaved.
  n = sz["matmul"]
  mm_rng = np.random.default_rng(2)
  ta = torch.from_numpy(mm_rng.standard_normal((n, n), np.float32))
  tw = torch.from_numpy(mm_rng.standard_normal((n, n), np.float32) / np.float32(np.sqrt(n)))
  a, w = jnp.asarray(ta.numpy()), jnp.asarray(tw.numpy())
  mm = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(mm(a, w))
  torch.mm(ta, tw)
  flops = model_flops(cfg, B, S, L)
  mm_flops = 2 * n**3
  per_round = []
  for i in range(1, rounds + 1):
    key = jax.random.key(i)
    ours_s, (state, m) = _timed(
        lambda state=state, key=key: jax.block_until_ready(update(state, gbatch, key))
    )
    torch_s, _ = _timed(lambda: torch_step(tmodel, topt, tb, config))
    mm_s = _best_matmul(lambda: jax.block_until_ready(mm(a, w)))
    tmm_s = _best_matmul(lambda: torch.mm(ta, tw))
    per_round.append(
        {
            "ours_s": ours_s,
            "torch_s": torch_s,
            "matmul_s": mm_s,
            "torch_matmul_s": tmm_s,
            "speedup": torch_s / ours_s,
            "matmul_fraction": (flops / ours_s) / (mm_flops / mm_s),
            "torch_matmul_fraction": (flops / torch_s) / (mm_flops / tmm_s),
        }
    )
  med = lambda k: statistics.median(r[k] for r in per_round)
  dot_rows, floor_s = dot_floor.time_dots(
      dots, compiler_options=step_lib.CPU_UPDATE_COMPILER_OPTIONS
  )
  tokens = B * S
  result = {
      "size": size,
      "model": {
          k: getattr(cfg, k)
          for k in (
              "vocab_size",
              "hidden_size",
              "intermediate_size",
              "num_layers",
              "num_heads",
              "num_kv_heads",
              "head_dim",
              "tie_word_embeddings",
          )
      },
      "params": param_count(cfg),
      "batch": B,
      "prompt_len": P,
      "response_len": L,
      "tokens_per_step": tokens,
      "valid_tokens_per_step": int(batch["attn_mask"].sum()),
      "response_tokens_per_step": int(batch["response_mask"].sum()),
      "model_flops_per_step": flops,
      "flops_formula": ("6*P_layers*B*S + 12*layers*heads*head_dim*S*B*S " "+ 6*hidden*vocab*B*L"),
      "matmul_n": n,
      "threads": {
          "cpus": threads,
          "torch": torch.get_num_threads(),
          "jax_devices": jax.device_count(),
      },
      "fused_chunk_size": config.rl.fused_chunk_size,
      "compile_s": compile_s,
      "ours_first_step_s": jax_first_s,
      "torch_first_step_s": torch_first_s,
      "check": check,
      "rounds": per_round,
      "ours": {
          "step_s": med("ours_s"),
          "tokens_per_s": tokens / med("ours_s"),
          "flops_per_s": flops / med("ours_s"),
      },
      "torch": {
          "step_s": med("torch_s"),
          "tokens_per_s": tokens / med("torch_s"),
          "flops_per_s": flops / med("torch_s"),
      },
      "matmul_flops_per_s": mm_flops / med("matmul_s"),
      "torch_matmul_flops_per_s": mm_flops / med("torch_matmul_s"),
      "speedup": med("speedup"),
      "dot_floor": {
          "seconds": floor_s,
          "dots": sum(dots.values()),
          "flops": sum(d.flops * n for d, n in dots.items()),
          "table": dot_floor.format_rows(dot_rows),
      },
      "matmul_fraction": med("matmul_fraction"),
      "torch_matmul_fraction": med("torch_matmul_fraction"),
  }
  result["targets_met"] = {
      f"speedup>={TARGET_SPEEDUP}": result["speedup"] >= TARGET_SPEEDUP,
      "matmul_fraction>=0.5": result["matmul_fraction"] >= 0.5,
  }
  return result


def format_table(r: dict) -> str:
  g = lambda x: f"{x / 1e9:.1f}"
  mdl = r["model"]
  lines = [
      f"Qwen2-shaped model: {r['params']:,} parameters (vocab {mdl['vocab_size']}, hidden "
      f"{mdl['hidden_size']}, {mdl['num_layers']} layers, {mdl['num_heads']} heads / "
      f"{mdl['num_kv_heads']} kv x {mdl['head_dim']}, mlp {mdl['intermediate_size']}, "
      f"tied {mdl['tie_word_embeddings']}), float32",
      f"batch {r['batch']} x ({r['prompt_len']} prompt + {r['response_len']} response) = "
      f"{r['tokens_per_step']} tokens ({r['valid_tokens_per_step']} non-pad, "
      f"{r['response_tokens_per_step']} response); model FLOPs/step "
      f"{r['model_flops_per_step'] / 1e9:.4g} G = {r['flops_formula']}",
      f"threads: {r['threads']}",
      f"trace + compile {r['compile_s']:.1f} s; first step: ours {r['ours_first_step_s']:.2f} s, "
      f"torch {r['torch_first_step_s']:.2f} s",
      "check after one step from the same state (ours, torch): "
      + "; ".join(
          f"{k} {v[0]:.6g}, {v[1]:.6g}" for k, v in r["check"].items() if isinstance(v, list)
      )
      + f"; max |params diff| / lr {r['check']['max_abs_param_diff_over_lr']:.2g}",
      "",
      "| round | ours s | torch s | torch/ours | matmul GFLOP/s (jax, torch) | ours / matmul |",
      "|---|---|---|---|---|---|",
  ]
  mm = 2 * r["matmul_n"] ** 3
  for i, x in enumerate(r["rounds"], 1):
    lines.append(
        f"| {i} | {x['ours_s']:.3f} | {x['torch_s']:.3f} | {x['speedup']:.2f} | "
        f"{g(mm / x['matmul_s'])}, {g(mm / x['torch_matmul_s'])} | "
        f"{100 * x['matmul_fraction']:.1f}% |"
    )
  o, t, fl = r["ours"], r["torch"], r["dot_floor"]
  lines += [
      "",
      "| median | step s | tokens/s | GFLOP/s | vs own framework's matmul |",
      "|---|---|---|---|---|",
      f"| ours (jax jit) | {o['step_s']:.3f} | {o['tokens_per_s']:,.0f} | {g(o['flops_per_s'])} | "
      f"{100 * r['matmul_fraction']:.1f}% of {g(r['matmul_flops_per_s'])} |",
      f"| torch eager | {t['step_s']:.3f} | {t['tokens_per_s']:,.0f} | {g(t['flops_per_s'])} | "
      f"{100 * r['torch_matmul_fraction']:.1f}% of {g(r['torch_matmul_flops_per_s'])} |",
      "",
      f"speedup (median of per-round torch/ours): {r['speedup']:.2f}x (target {TARGET_SPEEDUP}x); "
      f"ours vs {r['matmul_n']}^3 fp32 matmul: {100 * r['matmul_fraction']:.1f}% (target 50%)",
      "",
      f"dot floor (experiments/dot_floor.py): the update's {fl['dots']} dot executions, "
      f"{g(fl['flops'])} GFLOP, each timed alone at its shape, sum to {fl['seconds']:.3f} s "
      f"({g(fl['flops'] / fl['seconds'])} GFLOP/s), {100 * fl['seconds'] / o['step_s']:.0f}% of our "
      f"step; {TARGET_SPEEDUP}x torch would need {t['step_s'] / TARGET_SPEEDUP:.3f} s. "
      "The slowest dots in total:",
      fl["table"],
      machine.describe(r["machine"]),
  ]
  return "\n".join(lines)


def main(argv=None) -> dict:
  return machine.measure(run, format_table, parse_args(argv))


if __name__ == "__main__":
  main()
