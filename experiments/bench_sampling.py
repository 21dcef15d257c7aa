"""Sampling throughput: our jitted KV-cache sampler vs transformers `generate` (PyTorch, CPU).

Both run the same ~10M-parameter Qwen2-shaped model (random weights exported with `save_hf` and
loaded by `AutoModelForCausalLM`), 64 sequences (8 prompts x 8 samples) of 32-token prompts,
exactly 128 new tokens each (no stop ids), sampling at temperature 1 from the full distribution.
Throughput is new tokens per second, the best of `--repeats` timed runs after a warm-up; our
compile time (first call minus a timed call) is reported separately.

  python -m experiments.bench_sampling [--repeats 3]
"""

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from entropy_rl import sampling  # noqa: E402
from entropy_rl.models import Decoder, ModelConfig, init_params  # noqa: E402
from entropy_rl.models.hf import save_hf  # noqa: E402
from experiments import machine  # noqa: E402

CONFIG = ModelConfig(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=1024,
    num_layers=6,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    model_type="qwen2",
)
PROMPTS, SAMPLES, PROMPT_LEN, NEW_TOKENS = 8, 8, 32, 128


def time_ours(model, params, prompt, repeats):
  mask = np.ones_like(prompt)

  def run(seed):
    out = sampling.sample(
        model,
        params,
        prompt,
        mask,
        jax.random.key(seed),
        num_samples=SAMPLES,
        max_new_tokens=NEW_TOKENS,
        temperature=1.0,
    )
    jax.block_until_ready(out)
    assert int(out.mask_NxL.sum()) == PROMPTS * SAMPLES * NEW_TOKENS
    return out

  start = time.perf_counter()
  run(0)
  first = time.perf_counter() - start
  times = []
  for i in range(repeats):
    start = time.perf_counter()
    run(i + 1)
    times.append(time.perf_counter() - start)
  return min(times), first - min(times)


def time_transformers(path, prompt, repeats):
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  inputs = torch.tensor(prompt)
  kwargs = dict(
      attention_mask=torch.ones_like(inputs),
      do_sample=True,
      temperature=1.0,
      top_k=0,
      top_p=1.0,
      max_new_tokens=NEW_TOKENS,
      min_new_tokens=NEW_TOKENS,
      num_return_sequences=SAMPLES,
      use_cache=True,
      eos_token_id=None,
      pad_token_id=0,
  )

  def run(seed):
    torch.manual_seed(seed)
    with torch.inference_mode():
      out = model.generate(inputs, **kwargs)
    assert out.shape == (PROMPTS * SAMPLES, PROMPT_LEN + NEW_TOKENS)

  run(0)
  times = []
  for i in range(repeats):
    start = time.perf_counter()
    run(i + 1)
    times.append(time.perf_counter() - start)
  return min(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  m = machine.begin()

  params = init_params(CONFIG, jax.random.key(0))
  n_params = sum(x.size for x in jax.tree.leaves(params))
  prompt = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (PROMPTS, PROMPT_LEN))
  new_tokens = PROMPTS * SAMPLES * NEW_TOKENS
  with tempfile.TemporaryDirectory() as path:
    save_hf(params, CONFIG, path)
    hf_time = time_transformers(path, prompt, args.repeats)
  ours_time, compile_time = time_ours(Decoder(CONFIG), params, prompt, args.repeats)

  print(
      f"model: Qwen2-shaped, {n_params / 1e6:.1f}M params; {PROMPTS * SAMPLES} sequences, "
      f"{PROMPT_LEN}-token prompts, {NEW_TOKENS} new tokens, temperature 1; "
      f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
      f"({torch.get_num_threads()} threads)"
  )
  print("| sampler | seconds | new tokens/s |")
  print("|---|---|---|")
  print(f"| transformers generate (KV cache) | {hf_time:.2f} | {new_tokens / hf_time:,.0f} |")
  print(f"| entropy_rl.sampling | {ours_time:.2f} | {new_tokens / ours_time:,.0f} |")
  print(f"speed-up: {hf_time / ours_time:.2f}x; our compile time: {compile_time:.1f} s")
  print(machine.describe(machine.end(m)))


if __name__ == "__main__":
  main()
