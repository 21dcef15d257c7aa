"""Clip-higher (DAPO): PPO with eps_low = 0.2, eps_high = 0.28 (EM Table 2's second baseline)."""
from entropy_rl import config_lib


def method(c, model):
  del model
  c.loss.name = "ppo"
  c.loss.clip_ratio_low = 0.2
  c.loss.clip_ratio_high = 0.28


def get_config(arg=None):
  return config_lib.get_config_for(arg, method)
