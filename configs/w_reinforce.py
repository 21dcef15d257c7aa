"""W-REINFORCE (arXiv 2506.01347): positive-advantage tokens weighted by lambda = 0.1.

The paper's objective is lambda * PSR + NSR with rewards +-1 and no baseline; here lambda
multiplies the positive advantages of any estimator (GRPO's by default), on GRPO's loss.
"""

from entropy_rl import config_lib


def method(c, model):
  del model
  c.loss.name = "ppo"
  c.loss.positive_adv_weight = 0.1


def get_config(arg=None):
  return config_lib.get_config_for(arg, method)
