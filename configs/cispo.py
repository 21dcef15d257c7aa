"""CISPO (MiniMax-M1, arXiv 2506.13585): `-sg(clip(ratio, 1 - eps_low, 1 + eps_high)) * A * logp`.

Every token keeps its gradient; only the IS weight is clipped. The paper bounds the weight from
above only: eps_low = 1 (lower bound 0, as verl's example's eps_low = 10), eps_high = 0.2 (verl's
example `run_cispo_qwen2_5_0_5b_gsm8k.sh`), token-mean.
"""

from entropy_rl import config_lib


def method(c, model):
  del model
  c.loss.name = "cispo"
  c.loss.clip_ratio_low = 1.0
  c.loss.clip_ratio_high = 0.2
  c.loss.loss_agg_mode = "token-mean"


def get_config(arg=None):
  return config_lib.get_config_for(arg, method)
