"""Every config file and preset builds and validates; every tiny preset runs an update step."""
import importlib

import jax
import numpy as np
import pytest

from entropy_rl import config_lib, sharding
from tests import test_step

FAMILIES = ("default", "grpo", "clip_higher", "clip_cov", "kl_cov", "top_entropy")
TINY = [(f, "tiny") for f in FAMILIES] + [
    ("top_entropy", f"tiny,{m}") for m in ("bottom", "random", "quantile")]
PAPER = [(f, m) for f in FAMILIES[1:] for m in config_lib.PAPER_MODELS]


@pytest.mark.parametrize("family,arg", TINY + PAPER)
def test_preset_builds_and_validates(family, arg):
  c = importlib.import_module(f"configs.{family}").get_config(arg)
  config_lib.validate(c, num_devices=8)
  if arg.startswith("qwen"):
    assert c.model.source == "hf" and c.eval.files == config_lib.BENCHMARKS
    assert c.loss.kl_ref_coef == 0 and c.loss.entropy_coef == 0  # EM: no KL, no entropy loss


def test_paper_settings():
  get = lambda f, m: importlib.import_module(f"configs.{f}").get_config(m)
  em = get("grpo", "qwen2_5_7b")
  assert (em.rollout.prompts_per_step, em.rollout.num_samples, em.rl.num_minibatches) == (256, 8, 8)
  assert em.optim.lr == 1e-6 and em.rollout.max_new_tokens == 8192
  assert get("grpo", "qwen2_5_32b").optim.lr == 5e-7
  assert get("clip_higher", "qwen2_5_7b").loss.clip_ratio_high == 0.28
  cc = get("clip_cov", "qwen2_5_7b").loss
  assert (cc.clip_cov_ratio, cc.clip_cov_lb, cc.clip_cov_ub) == (2e-4, 1.0, 5.0)
  assert get("kl_cov", "qwen2_5_7b").loss.kl_cov_ratio == 2e-3
  assert get("kl_cov", "qwen2_5_32b").loss.kl_cov_ratio == 2e-4
  he = get("top_entropy", "qwen3_8b")
  assert he.loss.token_mask == "top_entropy" and he.loss.token_mask_rho == 0.2
  assert he.rl.dynamic_sampling and he.rollout.num_samples == 16
  assert get("top_entropy", "qwen3_8b,bottom").loss.token_mask == "bottom_entropy"
  with pytest.raises(ValueError, match="token mask"):
    get("top_entropy", "tiny,middle")


# grpo and clip_higher run in test_step.py; bottom/random share top_entropy's code path.
@pytest.mark.parametrize("family,arg", [("clip_cov", "tiny"), ("kl_cov", "tiny"),
                                        ("top_entropy", "tiny"), ("top_entropy", "tiny,quantile")])
def test_tiny_preset_runs_an_update_step(family, arg):
  c = importlib.import_module(f"configs.{family}").get_config(arg)
  small = test_step._config()
  c.rollout.prompts_per_step, c.rollout.num_samples = 4, 4
  c.rl, c.optim = small.rl, small.optim
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  state, m = test_step._run(c, mesh, test_step._batch())
  assert m["nonfinite"] == 0 and np.isfinite(m["loss"]) and m["grad_norm"] > 0
  if c.loss.token_mask != "all":
    assert m["n_token_mask"] < m["n_valid"]
