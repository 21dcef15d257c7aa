"""W-REINFORCE (arXiv 2506.01347): `lambda * L_PSR + L_NSR`, positive samples weighted lambda = 0.1.

`get_config("MODEL[,ADV]")`: ADV is `signed` (default, the paper's: rewards +-1 and no baseline,
so an all-wrong group is still pushed down; dynamic sampling, which would drop such groups, is
off) or `grpo` (lambda on GRPO's group-normalised advantages, where all-wrong groups get no
gradient).
"""

from entropy_rl import config_lib

ADVANTAGES = ("signed", "grpo")


def get_config(arg=None):
  model, adv = config_lib.model_and_variant(arg, "w_reinforce", "advantage", ADVANTAGES)

  def method(c, model):
    del model
    c.loss.name = "ppo"
    c.loss.positive_adv_weight = 0.1
    c.rl.advantage = adv
    if c.rl.advantage == "signed":
      c.rl.dynamic_sampling = False

  return config_lib.get_config_for(model, method)
