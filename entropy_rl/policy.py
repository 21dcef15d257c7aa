"""Building the policy: the tiny model (character tokenizer, warm start cached in the workdir) or a
Hugging Face checkpoint (`config.model.hf_path`) with its tokenizer.

Files cached in the workdir (tokenizer, warm start) go through `fileio`, so a gs:// workdir works
like a local one: libraries that write local directories work on a staged copy that is uploaded.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Any

import jax
from jax.experimental import multihost_utils

from entropy_rl import config_lib, fileio, models, sharding
from entropy_rl import data as data_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Policy:
  """What the loop needs to know about the model: static parts only (params live in the state)."""

  model: Any
  model_cfg: models.ModelConfig
  tokenizer: Any
  stop_ids: tuple[int, ...]
  pad_id: int


def param_shardings(model_cfg: models.ModelConfig, mesh, rules):
  """The params' NamedShardings on `mesh` by the logical-axis `rules` (no params are built)."""
  shapes = jax.eval_shape(functools.partial(models.init_params, model_cfg), jax.random.key(0))
  return sharding.logical_to_mesh_sharding(
      models.param_logical_axes(model_cfg), mesh, rules, shapes
  )


def build_policy(
    config, workdir: str, task, check_stop=None, mesh=None, rules=()
) -> tuple[Policy, Any]:
  """(Policy, params). `check_stop()` is called during the warm start and may raise. With a
  `mesh`, a checkpoint's params are read straight into their shardings by `rules`."""
  if config.model.source == "hf":
    from entropy_rl.models import hf  # pylint: disable=g-import-not-at-top

    dtypes = dict(
        dtype=config.model.dtype,
        param_dtype=config.model.param_dtype,
        remat=config.model.remat,
        attention_impl=config.model.attention_impl,
    )
    shardings = (
        None
        if mesh is None
        else param_shardings(hf.load_config(config.model.hf_path, **dtypes), mesh, rules)
    )
    model, params = hf.load_hf(config.model.hf_path, shardings=shardings, **dtypes)
    tokenizer = hf.load_tokenizer(config.model.hf_path)
    model_cfg = model.config
  else:
    tokenizer = process_zero_first("tokenizer", lambda: _cached_tokenizer(workdir))
    if task is not None:
      check_prompt_lengths(task, tokenizer, config.task.max_prompt_len)
    model_cfg = tiny_model_config(config.model, len(tokenizer))
    model = models.Decoder(model_cfg)
    if config.warm_start.enabled:
      params, info = process_zero_first(
          "warm_start",
          lambda: _cached_warm_start(config, workdir, model_cfg, task, tokenizer, check_stop),
      )
      log.info("warm start: %s", {k: v for k, v in info.items() if k != "settings"})
    else:
      params = models.init_params(model_cfg, jax.random.key(config.seed))
  stop_ids = tuple(i for i in {tokenizer.eos_token_id} if i is not None)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
  return Policy(model, model_cfg, tokenizer, stop_ids, pad_id), params


def _cached_tokenizer(workdir: str):
  with fileio.Staged(fileio.join(workdir, "tokenizer")) as staged:
    built = not os.path.exists(os.path.join(staged.local, "tokenizer.json"))
    tokenizer = data_lib.build_tokenizer(staged.local)
    if built:
      staged.commit()
  return tokenizer


def _cached_warm_start(config, workdir: str, model_cfg, task, tokenizer, check_stop):
  """The warm start cached in `config.warm_start.path` (runs may share it; one trained for another
  model or task is refused) or, when that is empty, in <workdir>/warm_start."""
  from entropy_rl import warmstart  # pylint: disable=g-import-not-at-top

  w = config.warm_start
  with fileio.Staged(w.path or fileio.join(workdir, "warm_start")) as staged:
    info_path = os.path.join(staged.local, warmstart.INFO_FILE)
    if w.path and os.path.exists(info_path):
      with open(info_path) as f:
        trained = json.load(f)["settings"]
      if trained["task"] != repr(task) or trained["model"] != json.loads(
          json.dumps(dataclasses.asdict(model_cfg))
      ):
        raise config_lib.ConfigError(
            f"config.warm_start.path={w.path!r}: holds a warm start "
            "trained for another task or model"
        )
    params, info = warmstart.warm_start(
        model_cfg,
        task,
        tokenizer,
        workdir=staged.local,
        steps=w.steps,
        batch_size=w.batch_size,
        lr=w.lr,
        corrupt_prob=w.corrupt_prob,
        seed=w.seed,
        max_new_tokens=config.rollout.max_new_tokens,
        max_prompt_len=config.task.max_prompt_len,
        check_stop=check_stop,
    )
    if not info["cached"]:
      staged.commit()
  return params, info


def check_prompt_lengths(task, tokenizer, max_prompt_len: int, num: int = 512) -> None:
  """ConfigError, before any training, when the task's prompts do not fit `max_prompt_len`."""
  prompts = [
      task.example(0, i, split).prompt for split in ("train", "eval") for i in range(num // 2)
  ]
  need = max(len(ids) for ids in tokenizer(prompts)["input_ids"])
  if need > max_prompt_len:
    raise config_lib.ConfigError(
        f"config.task.max_prompt_len={max_prompt_len} is too small: {task.name} prompts take up "
        f"to {need} tokens; set it to at least {need}"
    )


def process_zero_first(name: str, fn):
  """fn() on process 0, then, after a barrier, on the others: what it caches in a shared workdir
  (tokenizer, warm start) is written once and read complete (a host-local workdir is rebuilt)."""
  if jax.process_count() == 1:
    return fn()
  out = fn() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices(f"entropy_rl:{name}")
  return out if jax.process_index() == 0 else fn()


def tiny_model_config(c, vocab_size: int) -> models.ModelConfig:
  return models.ModelConfig(
      vocab_size=vocab_size,
      hidden_size=c.hidden_size,
      intermediate_size=c.intermediate_size,
      num_layers=c.num_layers,
      num_heads=c.num_heads,
      num_kv_heads=c.num_kv_heads,
      head_dim=c.head_dim,
      model_type="qwen2",
      tie_word_embeddings=True,
      dtype=c.dtype,
      param_dtype=c.param_dtype,
      remat=c.remat,
      attention_impl=c.attention_impl,
      max_position_embeddings=1024,
  )
