"""Clip-higher (DAPO): PPO with eps_low = 0.2, eps_high = 0.28 (EM Table 2's second baseline)."""

from entropy_rl import config_lib


def get_config(arg=None):
  return config_lib.get_config_for(arg, config_lib.ppo_method(clip_ratio_high=0.28))
