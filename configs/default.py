"""The embedded default: GRPO on a tiny policy and a synthetic verifiable task (2 CPU cores)."""

from configs import grpo


def get_config(arg=None):
  return grpo.get_config(arg)
