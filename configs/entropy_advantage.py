"""Entropy-shaped advantage (arXiv 2506.14758): `A' = A + min(alpha * sg(H), |A| / kappa)`.

alpha = 0.4, kappa = 2 (the shaping is at most half of |A|, so it never flips a sign), on GRPO.
"""

from entropy_rl import config_lib


def method(c, model):
  del model
  c.loss.name = "ppo"
  c.loss.entropy_adv_alpha = 0.4
  c.loss.entropy_adv_kappa = 2.0


def get_config(arg=None):
  return config_lib.get_config_for(arg, method)
