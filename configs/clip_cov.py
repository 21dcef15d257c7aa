"""Clip-Cov (EM Eq. 11-12): detach a random r-fraction of tokens whose covariance is in (lb, ub).

Paper runs: r = 2e-4, band (1, 5), eps_low = eps_high = 1. The paper's r assumes selection sets of
~1e5-1e6 tokens; at the tiny default (~5e2 tokens per mini-batch) it touches one token, so the tiny
preset scales r up: r = 0.02 with band (0.5, 10) detaches ~9 tokens per mini-batch and ended at
1.23x GRPO's entropy after 100 steps; r = 0.1 (1.87x at 100 steps) diverged after ~80 steps in
experiments/results/covariance_methods.

`get_config("MODEL,random")` is the count-matched control: each step detaches as many tokens as
Clip-Cov's band would, drawn at random from all unclipped tokens (`loss.clip_cov_tokens`).
"""

from entropy_rl import config_lib


def method(c, model):
  c.loss.name = "clip_cov"
  if model == "tiny":
    c.loss.clip_cov_ratio = 0.02
    c.loss.clip_cov_lb = 0.5
    c.loss.clip_cov_ub = 10.0
  else:
    c.loss.clip_cov_ratio = 2e-4
    c.loss.clip_cov_lb = 1.0
    c.loss.clip_cov_ub = 5.0
    c.loss.clip_ratio_low = 1.0
    c.loss.clip_ratio_high = 1.0


def get_config(arg=None):
  model, _, tokens = (arg or "tiny").partition(",")
  if tokens not in ("", "band", "random"):
    raise ValueError(f"configs/clip_cov.py:{arg}: {tokens!r} is not band or random")

  def with_tokens(c, model):
    method(c, model)
    c.loss.clip_cov_tokens = tokens or "band"

  return config_lib.get_config_for(model, with_tokens)
