"""Warm start: supervised training of the tiny policy on sometimes-wrong demonstrations.

RL needs a starting policy that behaves like a base LLM: often wrong, sometimes right, diverse.
Training on demonstrations of which a fraction `corrupt_prob` are wrong (a wrong intermediate step
or a wrong final answer) gives one, sized so that at temperature 1 the eval pass@1 is 0.10-0.40
and pass@16 0.55-0.85 (an easier base leaves RL little diversity to lose).

The result is cached in `workdir` (params in Hugging Face format via `save_hf`, plus
`warm_start.json` with the settings and the measured pass@1 / pass@16) and reused whenever the
settings match.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from entropy_rl import sampling
from entropy_rl.data.sources import encode_prompts
from entropy_rl.data.tasks import Task
from entropy_rl.data.tokenizer import decode_responses
from entropy_rl.models import Decoder, ModelConfig, init_params
from entropy_rl.models import hf as hf_lib
from entropy_rl.rewards.passk import avg_at_k, mean_pass_at_k

log = logging.getLogger(__name__)

INFO_FILE = "warm_start.json"
MODEL_DIR = "model"


def demonstration_batch(
    task: Task,
    tokenizer,
    *,
    seed: int,
    step: int,
    batch_size: int,
    corrupt_prob: float,
    max_new_tokens: int,
):
  """(tokens_BxT, attn_mask_BxT, target_mask_BxT) int32: [left-padded prompt | response + EOS |
  right padding], T a multiple of 8; target_mask marks the response tokens (EOS included).

  Problems are the train split's examples step * batch_size + j; demonstrations draw from a
  generator seeded with (seed, step), so a batch is a pure function of its arguments.
  """
  rng = np.random.default_rng([seed, step])
  examples = [task.example(seed, step * batch_size + j, "train") for j in range(batch_size)]
  responses = [task.demonstration(e, rng, corrupt_prob) for e in examples]
  prompts = tokenizer([e.prompt for e in examples])["input_ids"]
  answers = tokenizer(responses, add_special_tokens=False)["input_ids"]
  P = max(map(len, prompts))
  L = max(map(len, answers)) + 1
  if L > max_new_tokens:
    raise ValueError(f"a demonstration needs {L} tokens with EOS > max_new_tokens={max_new_tokens}")
  T = -(-(P + L) // 8) * 8
  tokens = np.full((batch_size, T), tokenizer.pad_token_id, np.int32)
  attn = np.zeros((batch_size, T), np.int32)
  target = np.zeros((batch_size, T), np.int32)
  for b, (p, a) in enumerate(zip(prompts, answers)):
    row = p + a + [tokenizer.eos_token_id]
    start = P - len(p)
    tokens[b, start : start + len(row)] = row
    attn[b, start : start + len(row)] = 1
    target[b, P : P + len(a) + 1] = 1
  return tokens, attn, target


def _loss(params, model, tokens_BxT, attn_BxT, target_BxT):
  """Mean next-token cross-entropy over the response tokens."""
  logits_BxTxV = model.apply({"params": params}, tokens_BxT, attn_mask_BxT=attn_BxT)
  ce_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV[:, :-1], tokens_BxT[:, 1:])
  mask_BxT = target_BxT[:, 1:].astype(jnp.float32)
  return jnp.sum(ce_BxT * mask_BxT) / jnp.maximum(jnp.sum(mask_BxT), 1.0)


@functools.partial(jax.jit, static_argnames=("model", "optimizer"), donate_argnums=(0, 1))
def _train_step(params, opt_state, tokens_BxT, attn_BxT, target_BxT, *, model, optimizer):
  loss, grads = jax.value_and_grad(_loss)(params, model, tokens_BxT, attn_BxT, target_BxT)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def make_optimizer(lr: float, steps: int, weight_decay: float = 0.01):
  """AdamW with 5% linear warmup, cosine decay to lr / 10, gradient clipping at norm 1."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, lr, max(1, steps // 20), max(steps, 2), end_value=lr / 10
  )
  return optax.chain(
      optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay)
  )


def train_supervised(
    model: Decoder,
    params,
    task: Task,
    tokenizer,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    corrupt_prob: float,
    seed: int,
    max_new_tokens: int,
    log_every: int = 100,
    check_stop=None,
):
  """`steps` AdamW steps on demonstration batches; returns (params, last loss).

  `check_stop()`, called before every step, may raise to abandon the training (nothing cached).
  """
  optimizer = make_optimizer(lr, steps)
  opt_state = optimizer.init(params)
  loss = float("nan")
  for step in range(steps):
    if check_stop is not None:
      check_stop()
    batch = demonstration_batch(
        task,
        tokenizer,
        seed=seed,
        step=step,
        batch_size=batch_size,
        corrupt_prob=corrupt_prob,
        max_new_tokens=max_new_tokens,
    )
    params, opt_state, loss = _train_step(
        params, opt_state, *batch, model=model, optimizer=optimizer
    )
    if log_every and (step + 1) % log_every == 0:
      log.info("warm start step %d/%d loss %.4f", step + 1, steps, float(loss))
  return params, float(loss)


def evaluate_task(
    model: Decoder,
    params,
    task: Task,
    tokenizer,
    *,
    num_prompts: int,
    num_samples: int,
    max_new_tokens: int,
    max_prompt_len: int,
    seed: int = 0,
    temperature: float = 1.0,
    eval_seed: int = 0,
    prompts_per_call: int = 32,
) -> dict:
  """pass@1 and unbiased pass@k (k = num_samples) at `temperature` over the first `num_prompts`
  problems of the task's eval split (`eval_seed`), sampled `prompts_per_call` prompts at a time
  (one compiled shape; the last chunk is padded with repeats that are not scored)."""
  examples = task.eval_examples(num_prompts, seed=eval_seed)
  correct = []
  for i, start in enumerate(range(0, num_prompts, prompts_per_call)):
    chunk = examples[start : start + prompts_per_call]
    padded = chunk + [chunk[0]] * (prompts_per_call - len(chunk))
    prompt_BxP, pmask_BxP = encode_prompts(tokenizer, [e.prompt for e in padded], max_prompt_len)
    out = sampling.sample(
        model,
        params,
        prompt_BxP,
        pmask_BxP,
        jax.random.fold_in(jax.random.key(seed), i),
        num_samples=num_samples,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        stop_ids=(tokenizer.eos_token_id,),
        pad_id=tokenizer.pad_token_id,
    )
    texts = decode_responses(tokenizer, out.tokens_NxL, out.mask_NxL)[: len(chunk) * num_samples]
    correct += [task.score(chunk[n // num_samples], t) for n, t in enumerate(texts)]
  correct_PxN = np.asarray(correct, np.float32).reshape(num_prompts, num_samples)
  return {
      "pass@1": avg_at_k(correct_PxN),
      f"pass@{num_samples}": mean_pass_at_k(correct_PxN, num_samples),
  }


def _settings(model_cfg, task, tokenizer, **kwargs) -> dict:
  return {
      "model": dataclasses.asdict(model_cfg),
      "task": repr(task),
      "vocab": tokenizer.get_vocab(),
      **kwargs,
  }


def _load_cached(workdir, settings, model_cfg):
  path = os.path.join(workdir, INFO_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    info = json.load(f)
  if info.get("settings") != json.loads(json.dumps(settings)):
    log.info("warm start cache in %s has other settings; retraining", workdir)
    return None
  _, params = hf_lib.load_hf(
      os.path.join(workdir, MODEL_DIR),
      dtype=model_cfg.dtype,
      param_dtype=model_cfg.param_dtype,
      remat=model_cfg.remat,
      attention_impl=model_cfg.attention_impl,
  )
  want = jax.eval_shape(functools.partial(init_params, model_cfg), jax.random.key(0))
  if jax.tree.structure(want) != jax.tree.structure(params) or any(
      a.shape != b.shape for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(params))
  ):
    raise ValueError(f"warm start checkpoint in {workdir} does not match the model config")
  return params, info


def warm_start(
    model_cfg: ModelConfig,
    task: Task,
    tokenizer,
    *,
    workdir: str,
    steps: int = 700,
    batch_size: int = 128,
    lr: float = 3e-3,
    corrupt_prob: float = 0.35,
    seed: int = 0,
    max_new_tokens: int = 32,
    max_prompt_len: int = 32,
    num_eval_prompts: int = 256,
    num_eval_samples: int = 16,
    check_stop=None,
) -> tuple[dict, dict]:
  """Trains (or reloads from `workdir`) the warm-started policy; returns (params, info).

  The defaults land the embedded default (the config's 2-layer d=128 policy on Countdown) in the
  window above. info: the settings, pass@1 and pass@{num_eval_samples} at temperature 1 on the
  task's eval split, seconds spent training and evaluating, the last loss, and `cached`.
  """
  settings = _settings(
      model_cfg,
      task,
      tokenizer,
      steps=steps,
      batch_size=batch_size,
      lr=lr,
      corrupt_prob=corrupt_prob,
      seed=seed,
      max_new_tokens=max_new_tokens,
      max_prompt_len=max_prompt_len,
      num_eval_prompts=num_eval_prompts,
      num_eval_samples=num_eval_samples,
  )
  cached = _load_cached(workdir, settings, model_cfg)
  if cached is not None:
    params, info = cached
    info = {**info, "cached": True}
  else:
    model = Decoder(model_cfg)
    start = time.monotonic()
    params = init_params(model_cfg, jax.random.key(seed))
    params, loss = train_supervised(
        model,
        params,
        task,
        tokenizer,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        corrupt_prob=corrupt_prob,
        seed=seed,
        max_new_tokens=max_new_tokens,
        check_stop=check_stop,
    )
    train_s = time.monotonic() - start
    start = time.monotonic()
    metrics = evaluate_task(
        model,
        params,
        task,
        tokenizer,
        num_prompts=num_eval_prompts,
        num_samples=num_eval_samples,
        max_new_tokens=max_new_tokens,
        max_prompt_len=max_prompt_len,
        seed=seed,
    )
    info = {
        "settings": settings,
        **metrics,
        "loss": loss,
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(time.monotonic() - start, 1),
    }
    os.makedirs(workdir, exist_ok=True)
    hf_lib.save_hf(params, model_cfg, os.path.join(workdir, MODEL_DIR))
    with open(os.path.join(workdir, INFO_FILE + ".tmp"), "w") as f:
      json.dump(info, f, indent=1)
    os.replace(os.path.join(workdir, INFO_FILE + ".tmp"), os.path.join(workdir, INFO_FILE))
    info = {**info, "cached": False}
  k = num_eval_samples
  message = (
      f"warm start ({'cached' if info['cached'] else 'trained'}): pass@1 {info['pass@1']:.3f} "
      f"pass@{k} {info[f'pass@{k}']:.3f} at T=1 on "
      f"{num_eval_prompts} eval problems; {info['train_seconds']:.0f} s training"
  )
  print(message, flush=True)
  log.info(message)
  return params, info
