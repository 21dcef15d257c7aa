"""Clip-Cov (EM Eq. 11-12): detach a random r-fraction of tokens whose covariance is in (lb, ub).

Paper runs: r = 2e-4, band (1, 5), eps_low = eps_high = 1. The tiny preset matches EM's strength
by covariance mass (experiments/README.md, "Scaling rule"): EM's r = 2e-4 tokens from the band hold
about 0.3-0.7% of a batch's positive covariance mass (from EM Table 1); on the tiny ~1e3-token
mini-batches the least Clip-Cov can detach is one token, r = 0.001, which holds 1.3% (measured on
the worked-steps setting; r = 0.02, the earlier preset, holds 18% with 17 tokens).

`get_config("MODEL,random")` is the count-matched control: each step detaches as many tokens as
Clip-Cov's band would, drawn at random from all unclipped tokens (`loss.clip_cov_tokens`).
"""

from entropy_rl import config_lib


def method(c, model):
  c.loss.name = "clip_cov"
  if model == "tiny":
    c.loss.clip_cov_ratio = 0.001
    c.loss.clip_cov_lb = 0.5
    c.loss.clip_cov_ub = 10.0
  else:
    c.loss.clip_cov_ratio = 2e-4
    c.loss.clip_cov_lb = 1.0
    c.loss.clip_cov_ub = 5.0
    c.loss.clip_ratio_low = 1.0
    c.loss.clip_ratio_high = 1.0


def get_config(arg=None):
  model, tokens = config_lib.model_and_variant(arg, "clip_cov", "tokens", ("band", "random"))

  def with_tokens(c, model):
    method(c, model)
    c.loss.clip_cov_tokens = tokens

  return config_lib.get_config_for(model, with_tokens)
