"""GSPO (arXiv 2507.18071): the sequence-level ratio s_i = exp(mean_t (logp - old_logp)), clipped.

Per token the ratio is `sg(s_i) * pi / sg(pi)` (log clamped at 10), clipped to [1 - 3e-4, 1 + 4e-4]
(the paper's eps, used at every scale), averaged seq-mean-token-mean as verl's `gspo` always does.
"""

from entropy_rl import config_lib


def method(c, model):
  del model
  c.loss.name = "gspo"
  c.loss.clip_ratio_low = 3e-4
  c.loss.clip_ratio_high = 4e-4
  c.loss.loss_agg_mode = "seq-mean-token-mean"


def get_config(arg=None):
  return config_lib.get_config_for(arg, method)
