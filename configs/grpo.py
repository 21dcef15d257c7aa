"""GRPO (the baseline): PPO clip 0.2 / 0.2, dual-clip c = 3, token-mean, no KL, no entropy bonus.

Presets: `tiny` (default) or a paper model: qwen2_5_7b, qwen2_5_32b, qwen3_8b, qwen3_14b, qwen3_32b.
"""

from entropy_rl import config_lib


def get_config(arg=None):
  return config_lib.get_config_for(arg, config_lib.ppo_method(clip_ratio_high=0.2))
