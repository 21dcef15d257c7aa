"""Forking tokens (HE): the policy gradient only on the rho = 20% highest-entropy tokens.

`get_config("MODEL[,MASK]")`: MODEL is `tiny` or a paper model; MASK is `top` (default, HE's
method), `bottom` (the bottom 80%: HE's control that collapses), `random` (a random 20%) or
`quantile` (TRL's threshold variant, denominator = all valid tokens). HE runs the DAPO recipe, so
clip-higher (eps_high = 0.28) is on.
"""

from entropy_rl import config_lib

MASKS = {
    "top": "top_entropy",
    "bottom": "bottom_entropy",
    "random": "random",
    "quantile": "top_quantile",
}


def get_config(arg=None):
  model, mask = config_lib.model_and_variant(arg, "top_entropy", "token mask", tuple(MASKS))

  def method(c, model):
    del model
    c.loss.name = "ppo"
    c.loss.clip_ratio_low = 0.2
    c.loss.clip_ratio_high = 0.28
    c.loss.token_mask = MASKS[mask]
    c.loss.token_mask_rho = 0.2

  return config_lib.get_config_for(model, method)
