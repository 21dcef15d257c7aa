"""Adaptive entropy coefficient (Skywork-OR1, arXiv 2505.22312; TRL's `use_adaptive_entropy`).

Once per optimizer step, from the token-mean entropy H of that step's mini-batch:
`c <- min(c + delta, c_max)` if H <= target else `max(c - delta, c_min)`; the bonus `-c * H` is
applied at the next step only if H <= target. Paper models: target 0.2, delta 0.005, c in [0, 1]
from c_0 = 0 (TRL's defaults). Tiny: GRPO's entropy falls 0.57 -> 0.12 in 500 steps here, so the
target is 0.3 with delta 5e-4 and c_max 0.05 (an entropy bonus of 0.01 kept 1.10x GRPO's entropy).
"""

from entropy_rl import config_lib


def method(c, model):
  c.loss.name = "ppo"
  c.loss.adaptive_entropy = True
  c.loss.entropy_coef = 0.0
  c.loss.entropy_coef_min = 0.0
  if model == "tiny":
    c.loss.entropy_target = 0.3
    c.loss.entropy_coef_delta = 5e-4
    c.loss.entropy_coef_max = 0.05
  else:
    c.loss.entropy_target = 0.2
    c.loss.entropy_coef_delta = 0.005
    c.loss.entropy_coef_max = 1.0


def get_config(arg=None):
  return config_lib.get_config_for(arg, method)
