"""Quantile advantage estimation (QAE, arXiv 2509.22611): the group's K-quantile reward as baseline.

`A = (r - Q_K(r_group)) / (std_g + eps)`: GRPO with its mean replaced by the inverted-CDF K-quantile.
With binary rewards and success rate p, Q_K = 0 when p <= 1 - K (only successes are pushed up) and
1 otherwise (only failures pushed down). K = 0.4, on GRPO's loss.
"""

from entropy_rl import config_lib


def method(c, model):
  del model
  c.rl.advantage = "qae"
  c.rl.qae_quantile = 0.4


def get_config(arg=None):
  return config_lib.get_config_for(arg, method)
