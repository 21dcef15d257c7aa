"""RL-step benchmark (issue 15): entropy_rl's trainer vs TRL's `GRPOTrainer`, CPU, one run.

One RL step: 8 prompts x 8 samples (at most 64 new tokens, temperature 1, stopping at EOS), the
reward, GRPO advantages, one optimizer step over the 64 sequences. The policy is a randomly
initialised Qwen2 of 7,878,656 parameters: hidden 256, 8 layers, 8 heads / 4 KV heads of 32, MLP
1024, tied embeddings, and the 23-token vocabulary of the tiny preset's character tokenizer
(7,872,768 parameters in the blocks and final norm + 23 x 256 in the embedding).

Ours: `entropy_rl.trainer.train` with configs/grpo.py:tiny overridden to that model: warm start
off, one mini-batch of one micro-batch (one AdamW step per RL step), no warmup of the learning
rate, no evaluation. Step time = the trainer's own time/rollout + time/reward +
time/advantage_batch + time/update: sampling through the finished update, without the metric
writing, progress bar and checkpoints that follow.

TRL: `GRPOTrainer` on the same weights (our initial parameters, built by the trainer's own
`policy.build_policy`, exported with `save_hf` and loaded as `Qwen2ForCausalLM` float32; the
logits of both are compared), the same tokenizer, the same prompts in the same order (shuffling
off), the same reward object (entropy_rl's 'task' reward). Step time = `on_step_begin` to
`on_step_end`: generation, reward, loss, backward, clipping and AdamW.

Fairness choices:
- Same work: per_device_train_batch_size = generation batch = 64, num_generations 8,
  max_completion_length 64, temperature 1, top_p 1, top_k 0; one gradient-accumulation step and
  num_iterations 1, so one AdamW step per RL step and no separate old-log-prob pass on either
  side (ours takes the sampler's); beta 0 (no reference model, as the preset); float32 (TRL's bf16
  default off) and no gradient checkpointing (TRL's default on; ours does not remat); loss_type
  'dapo' is our token-mean, clipping 0.2 / 0.2 (ours adds the elementwise dual clip c = 3);
  learning rate, Adam betas, weight decay and gradient clipping as ours.
- Nothing turned off that either ships with: our jitted continuous-batching sampler and fused
  log-prob/entropy update; transformers' `generate` with its KV cache, SDPA attention and TRL's
  default optimizer. Each pads as it ships: ours prompts to task.max_prompt_len and updates on
  prompt + max_new_tokens columns, TRL to the longest prompt and completion of the batch.
- No evaluation, checkpoint, logging or progress bar inside either's timed step.
- Throughput = completion tokens (EOS included) actually generated over the steady-state steps /
  their time; the first --warmup steps (our compilation, TRL's first calls) are not counted.
  Lengths are not forced: both sample the same random policy, so their length distributions
  agree; the mean completion lengths are reported.
- Both use every usable core (XLA's default: one CPU device; torch.set_num_threads), one after
  the other in one process, ours first. The load average is recorded before and after (experiments/machine.py).

TRL is pinned in requirements-test.txt; without it the TRL side is skipped with a message.

  python -m experiments.bench_rl_step [--steps 10] [--warmup 2] [--packing] [--out r.json]
  python -m experiments.bench_rl_step --smoke    # a tiny model, 8 x 2, 8 tokens, 3 steps: a minute
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from entropy_rl import metrics, policy as policy_lib, trainer  # noqa: E402
from entropy_rl import data as data_lib  # noqa: E402
from entropy_rl import rewards as rewards_lib  # noqa: E402
from entropy_rl.models import hf  # noqa: E402
from experiments import common, machine  # noqa: E402

MODEL = {
    "hidden_size": 256,
    "num_layers": 8,
    "num_heads": 8,
    "num_kv_heads": 4,
    "head_dim": 32,
    "intermediate_size": 1024,
}
SMOKE_MODEL = {
    "hidden_size": 32,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 8,
    "intermediate_size": 64,
}
SIZES = {
    "full": dict(model=MODEL, prompts=8, samples=8, max_new_tokens=64, steps=10, warmup=2),
    # 8 prompts: a test's 8 fake CPU devices each take one.
    "smoke": dict(model=SMOKE_MODEL, prompts=8, samples=2, max_new_tokens=8, steps=3, warmup=1),
}
TRL_MISSING = "TRL side skipped: trl is not installed (pip install -r requirements-test.txt)"
OURS_TIME_KEYS = ("time/rollout", "time/reward", "time/advantage_batch", "time/update")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument(
      "--smoke", action="store_true", help="tiny model and batch, 3 steps (about a minute)"
  )
  p.add_argument("--steps", type=int, default=None, help="RL steps per side (10; smoke 3)")
  p.add_argument("--warmup", type=int, default=None, help="first steps not counted (2; smoke 1)")
  p.add_argument("--workdir", default="", help="our run's workdir and TRL's output (a temp dir)")
  p.add_argument("--out", default="", help="also write the results as JSON here")
  p.add_argument(
      "--packing",
      action="store_true",
      help="ours with rl.packing (the update computes on no padding; off in the preset)",
  )
  args = p.parse_args(argv)
  size = SIZES["smoke" if args.smoke else "full"]
  args.steps = size["steps"] if args.steps is None else args.steps
  args.warmup = size["warmup"] if args.warmup is None else args.warmup
  if not 0 <= args.warmup < args.steps:
    raise ValueError(
        f"need 0 <= --warmup < --steps, got --warmup {args.warmup} --steps " f"{args.steps}"
    )
  return args


def bench_config(size: dict, steps: int, packing: bool = False):
  """configs/grpo.py:tiny with the benchmark's model, batch and length, one AdamW step per RL
  step, warm start and evaluation off; `packing`: the update on packed rows (`rl.packing`)."""
  overrides = {f"model.{k}": v for k, v in size["model"].items()}
  overrides.update(
      {
          "num_steps": steps,
          "checkpoint_every": steps,
          "eval_every": 0,
          "warm_start.enabled": False,
          "optim.warmup_steps": 0,
          "rollout.prompts_per_step": size["prompts"],
          "rollout.num_samples": size["samples"],
          "rollout.max_new_tokens": size["max_new_tokens"],
          "rollout.temperature": 1.0,
          "rl.num_minibatches": 1,
          "rl.num_microbatches": 1,
          "rl.ppo_epochs": 1,
          "rl.packing": packing,
      }
  )
  return common.load_config("grpo", "tiny", overrides)


def steady(seconds: list, tokens: list, warmup: int) -> dict:
  """Per-step series and their steady-state summary (the steps after `warmup`)."""
  s, n = seconds[warmup:], tokens[warmup:]
  return {
      "step_s": seconds,
      "completion_tokens": tokens,
      "steady_steps": len(s),
      "mean_step_s": sum(s) / len(s),
      "completion_tokens_per_step": sum(n) / len(n),
      "tokens_per_s": sum(n) / sum(s),
  }


def run_ours(config, workdir: str, warmup: int) -> dict:
  """entropy_rl.trainer.train; per-step times and completion tokens from its metrics.jsonl."""
  trainer.train(config, workdir)
  records = [
      r for r in metrics.read_metrics(os.path.join(workdir, metrics.METRICS_FILE)) if r["step"] > 0
  ]
  rows = config.rollout.prompts_per_step * config.rollout.num_samples
  seconds = [sum(r[k] for k in OURS_TIME_KEYS) for r in records]
  tokens = [int(round(r["response/len_mean"] * rows)) for r in records]
  out = steady(seconds, tokens, warmup)
  out["phase_s"] = {k: [r[k] for r in records] for k in OURS_TIME_KEYS}
  return out


def logit_gap(policy, params, hf_model, prompts, max_len: int) -> float:
  """Max |logit difference| of our model and the exported one on `prompts` (valid positions)."""
  tokens, mask = data_lib.encode_prompts(policy.tokenizer, prompts, max_len)
  ours = np.asarray(jax.jit(policy.model.apply)({"params": params}, tokens, attn_mask_BxT=mask))
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    theirs = hf_model(
        input_ids=torch.from_numpy(tokens).long(),
        attention_mask=torch.from_numpy(mask).long(),
        position_ids=torch.from_numpy(positions).long(),
    ).logits.numpy()
  valid = mask.astype(bool)
  return float(np.max(np.abs(ours[valid] - theirs[valid])))


def run_trl(config, policy, model_dir: str, task, out_dir: str, warmup: int) -> dict:
  """TRL's GRPOTrainer on the exported model, the same prompts, reward and batch."""
  import datasets  # pylint: disable=g-import-not-at-top
  import trl  # pylint: disable=g-import-not-at-top

  c = config
  rows = c.rollout.prompts_per_step * c.rollout.num_samples
  seed = c.seed
  reward_fn = rewards_lib.get_reward_fn(c.reward.name, task=task)
  tokens = []

  def task_reward(prompts, completions, completion_ids, index, **kwargs):
    del prompts, kwargs
    tokens.append(sum(len(ids) for ids in completion_ids))
    examples = [task.example(seed, i, "train") for i in index]
    return reward_fn(examples, completions)[0].tolist()

  class StepTimer(transformers.TrainerCallback):

    def __init__(self):
      self.seconds, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
      self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
      self.seconds.append(time.perf_counter() - self._start)

  # Example g of our trainer's step s is g in [s P, (s + 1) P) of the seeded train stream.
  dataset = datasets.Dataset.from_list(
      [
          {"prompt": task.example(seed, g, "train").prompt, "index": g}
          for g in range(c.num_steps * c.rollout.prompts_per_step)
      ]
  )
  args = trl.GRPOConfig(
      output_dir=out_dir,
      max_steps=c.num_steps,
      per_device_train_batch_size=rows,
      gradient_accumulation_steps=1,
      num_generations=c.rollout.num_samples,
      max_completion_length=c.rollout.max_new_tokens,
      temperature=c.rollout.temperature,
      top_p=c.rollout.top_p,
      top_k=c.rollout.top_k,
      num_iterations=1,
      beta=0.0,
      loss_type="dapo",
      epsilon=c.loss.clip_ratio_low,
      epsilon_high=c.loss.clip_ratio_high,
      learning_rate=c.optim.lr,
      lr_scheduler_type="constant",
      warmup_steps=0,
      weight_decay=c.optim.weight_decay,
      adam_beta1=c.optim.b1,
      adam_beta2=c.optim.b2,
      max_grad_norm=c.optim.grad_clip,
      bf16=False,
      fp16=False,
      gradient_checkpointing=False,
      use_cpu=True,
      shuffle_dataset=False,
      seed=seed,
      logging_strategy="no",
      save_strategy="no",
      eval_strategy="no",
      report_to="none",
      disable_tqdm=True,
      log_completions=False,
  )
  model = transformers.Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  timer = StepTimer()
  grpo = trl.GRPOTrainer(
      model=model,
      reward_funcs=task_reward,
      args=args,
      train_dataset=dataset,
      processing_class=policy.tokenizer,
      callbacks=[timer],
  )
  grpo.train()
  if len(tokens) != len(timer.seconds):
    raise RuntimeError(f"{len(tokens)} reward calls for {len(timer.seconds)} TRL steps")
  out = steady(timer.seconds, tokens, warmup)
  out.update(trl=trl.__version__, optim=str(args.optim), torch_threads=torch.get_num_threads())
  return out


def run(args) -> dict:
  size = SIZES["smoke" if args.smoke else "full"]
  config = bench_config(size, args.steps, args.packing)
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  transformers.utils.logging.disable_progress_bar()
  with tempfile.TemporaryDirectory() as tmp:
    workdir = args.workdir or tmp
    ours_dir, model_dir = os.path.join(workdir, "ours"), os.path.join(workdir, "hf_model")
    task = data_lib.make_task(config.task)
    # The trainer's own initial policy (the same call, seed and cached tokenizer), exported.
    policy, params = policy_lib.build_policy(config, ours_dir, task)
    hf.save_hf(params, policy.model_cfg, model_dir)
    prompts = [
        task.example(config.seed, g, "train").prompt for g in range(config.rollout.prompts_per_step)
    ]
    gap = logit_gap(
        policy,
        params,
        transformers.Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        prompts,
        config.task.max_prompt_len,
    )
    result = {
        "size": "smoke" if args.smoke else "full",
        "packing": config.rl.packing,
        "model": {
            **size["model"],
            "vocab_size": policy.model_cfg.vocab_size,
            "tie_word_embeddings": policy.model_cfg.tie_word_embeddings,
        },
        "params": sum(x.size for x in jax.tree.leaves(params)),
        "prompts": config.rollout.prompts_per_step,
        "samples": config.rollout.num_samples,
        "max_new_tokens": config.rollout.max_new_tokens,
        "max_prompt_len": config.task.max_prompt_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "max_abs_logit_diff": gap,
        "jax_devices": jax.device_count(),
        "versions": {
            "jax": jax.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    result["ours"] = run_ours(config, ours_dir, args.warmup)
    if importlib.util.find_spec("trl") is None:
      print(TRL_MISSING, flush=True)
      result["trl"], result["speedup"] = {"skipped": TRL_MISSING}, None
    else:
      result["trl"] = run_trl(
          config, policy, model_dir, task, os.path.join(workdir, "trl"), args.warmup
      )
      result["versions"]["trl"] = result["trl"].pop("trl")
      result["speedup"] = result["ours"]["tokens_per_s"] / result["trl"]["tokens_per_s"]
  return result


def format_table(r: dict) -> str:
  m = r["model"]
  lines = [
      f"RL step: {r['prompts']} prompts x {r['samples']} samples, <= {r['max_new_tokens']} new "
      f"tokens, temperature 1, one AdamW step; Qwen2 {r['params']:,} parameters (random; hidden "
      f"{m['hidden_size']}, {m['num_layers']} layers, {m['num_heads']} heads / "
      f"{m['num_kv_heads']} kv x {m['head_dim']}, mlp {m['intermediate_size']}, vocab "
      f"{m['vocab_size']}), float32; same weights: max |logit diff| {r['max_abs_logit_diff']:.2g}",
      f"{r['steps']} steps per side, the first {r['warmup']} not counted; versions "
      + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
      "",
      "| trainer | steady steps | s / step | completion tokens / step | completion tokens/s | "
      "warm-up steps s |",
      "|---|---|---|---|---|---|",
  ]
  ours = "entropy_rl.trainer" + (" (rl.packing)" if r.get("packing") else "")
  for name, key in ((ours, "ours"), ("TRL GRPOTrainer", "trl")):
    x = r[key]
    if "skipped" in x:
      lines.append(f"| {name} | {x['skipped']} | | | | |")
      continue
    warm = ", ".join(f"{s:.2f}" for s in x["step_s"][: r["warmup"]])
    lines.append(
        f"| {name} | {x['steady_steps']} | {x['mean_step_s']:.3f} | "
        f"{x['completion_tokens_per_step']:.1f} | {x['tokens_per_s']:,.1f} | {warm} |"
    )
  phases = r["ours"]["phase_s"]
  lines.append("")
  lines.append(
      "ours, mean s per steady step: "
      + ", ".join(f"{k.split('/')[1]} {np.mean(v[r['warmup']:]):.3f}" for k, v in phases.items())
  )
  if r["speedup"] is not None:
    lines.append(f"speed-up (completion tokens/s, ours / TRL): {r['speedup']:.2f}x (target 3x)")
  lines.append(machine.describe(r["machine"]))
  return "\n".join(lines)


def main(argv=None) -> dict:
  args = parse_args(argv)
  m = machine.begin()
  r = run(args)
  r["machine"] = machine.end(m)
  print(format_table(r))
  print(json.dumps(r))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(r, f, indent=1)
  return r


if __name__ == "__main__":
  main()
