"""Archer's dual-token constraints (arXiv 2507.15778).

Per response, tokens with entropy >= the 0.8 quantile (the top 20%) are high-entropy: clip
eps = 0.5 and no KL; the other tokens: clip eps = 0.2 plus a k3 KL to the reference policy with
weight 0.001. Dual-clip c = 3 as in GRPO.
"""

from entropy_rl import config_lib


def method(c, model):
  del model
  c.loss.name = "archer"
  c.loss.clip_ratio_low = 0.2
  c.loss.clip_ratio_high = 0.2
  c.loss.archer_high_clip_ratio_low = 0.5
  c.loss.archer_high_clip_ratio_high = 0.5
  c.loss.archer_entropy_quantile = 0.8
  c.loss.entropy_quantile_scope = "response"
  c.loss.kl_ref_coef = 1e-3
  c.loss.kl_ref_estimator = "k3"


def get_config(arg=None):
  return config_lib.get_config_for(arg, method)
