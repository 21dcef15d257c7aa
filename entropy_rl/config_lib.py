"""The run configuration: one ConfigDict shared by every config file, paper presets, validation.

`configs/<family>.py` files start from `base_config()`, set their method, and apply a preset chosen
by `get_config(arg)`. `validate(config)` runs before anything is compiled and raises one
`ConfigError` naming the offending key; `typed(config)` then builds the frozen dataclasses
(`RunConfig`: loss, rollout, evaluation, update, optimizer, mesh) that the layers below the trainer
take. `LossConfig`'s defaults are the loss block's.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import ml_collections

from entropy_rl import advantages, fileio, losses, rewards
from entropy_rl.data import tasks as tasks_lib
from entropy_rl.errors import ConfigError
from entropy_rl.models.config import ATTENTION_IMPLS

# The papers' models. Sizes matter only for presets; weights come from `model.hf_path`.
PAPER_MODELS = ("qwen2_5_7b", "qwen2_5_32b", "qwen3_8b", "qwen3_14b", "qwen3_32b")
BENCHMARKS = (
    "math500.jsonl",
    "aime24.jsonl",
    "amc23.jsonl",
    "minerva_math.jsonl",
    "olympiadbench.jsonl",
    "gsm8k_test.jsonl",
)


# ----------------------------------------------------------------------------- typed configs
# `typed(config)` builds these once, after `validate`; the layers below the trainer take them.


def _is_real(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """The policy loss, `config.loss` (each option is described in `losses`).

  The defaults are GRPO's (eps_low = eps_high = 0.2, token-mean, all tokens) and those of
  `base_config().loss`. Every instance is valid: construction raises one ValueError naming the
  field, e.g. `config.loss.token_mask_rho`.
  """

  name: str = "ppo"
  clip_ratio_low: float = 0.2
  clip_ratio_high: float = 0.2
  clip_ratio_c: float = 3.0
  clip_cov_ratio: float = 2e-4
  clip_cov_lb: float = 1.0
  clip_cov_ub: float = 5.0
  clip_cov_tokens: str = "band"  # band: EM's rule | random: the count-matched random control
  kl_cov_ratio: float = 2e-3
  kl_cov_coef: float = 1.0
  loss_agg_mode: str = "token-mean"
  token_mask: str = "all"
  token_mask_rho: float = 0.2
  selection_scope: str = "microbatch"
  kl_ref_coef: float = 0.0
  kl_ref_estimator: str = "k3"
  entropy_coef: float = 0.0  # with adaptive_entropy: the initial coefficient c_0
  adaptive_entropy: bool = False
  entropy_target: float = 0.2  # TRL's defaults for target, delta, min, max
  entropy_coef_delta: float = 0.005
  entropy_coef_min: float = 0.0
  entropy_coef_max: float = 1.0
  entropy_adv_alpha: float = 0.0  # 0 disables entropy-shaped advantages
  entropy_adv_kappa: float = 2.0
  positive_adv_weight: float = 1.0  # W-REINFORCE lambda; 1 disables
  archer_entropy_quantile: float = 0.8
  archer_high_clip_ratio_low: float = 0.5
  archer_high_clip_ratio_high: float = 0.5
  entropy_quantile_scope: str = "selection"
  # Not a config key: the data-parallel devices (mesh.data x mesh.fsdp) that selection_scope='device'
  # splits each micro-batch's rows over; `typed` sets it from the mesh.
  selection_shards: int = 1
  # Not a config key: the response budget L (rollout.max_new_tokens), Dr.GRPO's constant in
  # seq-mean-token-sum-norm whatever the update's arrays are trimmed to; 0 = the arrays' length.
  max_response_len: int = 0

  def __post_init__(self):
    def fail(key, what):
      raise ValueError(f"config.loss.{key} must be {what}; got {getattr(self, key)!r}")

    def choice(key, options):
      if getattr(self, key) not in options:
        fail(key, f"one of {tuple(options)}")

    def real(key, lo=-math.inf, hi=math.inf, lo_open=False, hi_open=False):
      x = getattr(self, key)
      ok = _is_real(x) and (x > lo if lo_open else x >= lo) and (x < hi if hi_open else x <= hi)
      if not ok:
        fail(key, f"a real number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")

    choice("name", losses.LOSS_NAMES)
    real("clip_ratio_low", 0.0, 1.0)
    real("clip_ratio_high", 0.0)
    real("clip_ratio_c", 1.0, lo_open=True)
    real("clip_cov_ratio", 0.0, 1.0, lo_open=True)
    real("clip_cov_lb")
    real("clip_cov_ub")
    if not self.clip_cov_lb < self.clip_cov_ub:
      fail("clip_cov_ub", f"greater than config.loss.clip_cov_lb = {self.clip_cov_lb!r}")
    choice("clip_cov_tokens", losses.CLIP_COV_TOKENS)
    real("kl_cov_ratio", 0.0, 1.0, lo_open=True)
    real("kl_cov_coef", 0.0)
    choice("loss_agg_mode", losses.AGG_MODES)
    choice("token_mask", tuple(losses.TOKEN_MASKS))
    real("token_mask_rho", 0.0, 1.0, lo_open=True)
    choice("selection_scope", losses.SELECTION_SCOPES)
    real("kl_ref_coef", 0.0)
    choice("kl_ref_estimator", losses.KL_ESTIMATORS)
    real("entropy_coef")
    real("entropy_target", 0.0)
    real("entropy_coef_delta", 0.0)
    real("entropy_coef_min", 0.0)
    real("entropy_coef_max", self.entropy_coef_min)
    if (
        self.adaptive_entropy
        and not self.entropy_coef_min <= self.entropy_coef <= self.entropy_coef_max
    ):
      fail(
          "entropy_coef",
          "in [config.loss.entropy_coef_min, config.loss.entropy_coef_max] = "
          f"[{self.entropy_coef_min}, {self.entropy_coef_max}] with adaptive_entropy",
      )
    real("entropy_adv_alpha", 0.0)
    real("entropy_adv_kappa", 0.0, lo_open=True)
    real("positive_adv_weight", 0.0)
    real("archer_entropy_quantile", 0.0, 1.0)
    real("archer_high_clip_ratio_low", 0.0, 1.0)
    real("archer_high_clip_ratio_high", 0.0)
    choice("entropy_quantile_scope", losses.ENTROPY_QUANTILE_SCOPES)
    if not (isinstance(self.selection_shards, int) and self.selection_shards >= 1):
      fail("selection_shards", "a positive int (the mesh's data x fsdp devices)")
    if not (isinstance(self.max_response_len, int) and self.max_response_len >= 0):
      fail("max_response_len", "a non-negative int (rollout.max_new_tokens)")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """What sampling a training rollout reads: `config.rollout`, `task.max_prompt_len`, DAPO's
  dynamic sampling (`rl.dynamic_sampling`, `rl.dynamic_sampling_max_draws`,
  `rl.filter_groups_metric`) and `reward.timeout_s` (named in warnings)."""

  prompts_per_step: int
  num_samples: int
  max_new_tokens: int
  temperature: float
  top_p: float
  top_k: int
  max_rows_in_flight: int  # sampler slots (KV cache rows); 0 = every (prompt, sample) pair
  kv_cache_fraction: float  # read by resolve_rows_in_flight (max_rows_in_flight = -1)
  prefill_chunks: int  # the prompts are prefilled in this many chunks, one after another
  max_prompt_len: int
  dynamic_sampling: bool
  dynamic_sampling_max_draws: int
  filter_groups_metric: str
  reward_timeout_s: float


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """How an evaluation samples, `config.eval` (which examples it reads stays with the data)."""

  num_samples: int
  temperature: float
  extra_temperatures: tuple[float, ...]  # each also sampled, logged as eval/T<t>/avg@k, pass@k
  max_new_tokens: int  # -1 = rollout.max_new_tokens
  max_rows_in_flight: int  # -1 = as many as a training rollout, 0 = all


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
  """What `step.update` reads: the loss, `config.rl`'s splits and `rollout.temperature` (the
  trainer's log-probs are those of the sampler's temperature-scaled distribution)."""

  loss: LossConfig
  num_minibatches: int
  num_microbatches: int
  ppo_epochs: int
  recompute_old_logp: bool
  fused_chunk_size: int
  temperature: float
  skip_nonfinite: str  # 'step' | 'minibatch' (rl.skip_nonfinite)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with global-norm clipping on a warmup + constant / cosine schedule, `config.optim`."""

  lr: float
  schedule: str
  warmup_steps: int
  weight_decay: float
  b1: float
  b2: float
  grad_clip: float


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh axis sizes, `config.mesh`; one may be -1 (the remaining devices)."""

  data: int
  fsdp: int
  tensor: int


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """The typed parts of a run's config (the model's is `models.ModelConfig`, built with the
  policy). Frozen and hashable, so any part can be a static argument of `jax.jit`."""

  rollout: RolloutConfig
  eval: EvalConfig
  update: UpdateConfig
  optim: OptimConfig
  mesh: MeshConfig


def _from_block(cls, block, **extra):
  """`cls` from the fields of ConfigDict `block` that `extra` does not give."""
  return cls(
      **{f.name: block[f.name] for f in dataclasses.fields(cls) if f.name not in extra}, **extra
  )


def loss_keys() -> list[str]:
  """The `config.loss` keys: LossConfig's fields but the derived ones (set by `typed`)."""
  derived = ("selection_shards", "max_response_len")
  return [f.name for f in dataclasses.fields(LossConfig) if f.name not in derived]


def loss_config(block, selection_shards: int = 1, max_response_len: int = 0) -> LossConfig:
  """The LossConfig of a `config.loss` ConfigDict; raises ValueError naming a bad or unknown key."""
  known = loss_keys()
  for key in block.keys():
    if key not in known:
      raise ValueError(f"config.loss.{key} is not a loss option; known: {sorted(known)}")
  return LossConfig(
      **block.to_dict(), selection_shards=selection_shards, max_response_len=max_response_len
  )


def typed(c: ml_collections.ConfigDict, num_devices: int = 1) -> RunConfig:
  """The RunConfig of a config after `validate` and `resolve_microbatches`, for a run on
  `num_devices` devices (they size selection_scope='device')."""
  shards = data_parallel_devices(c, num_devices)
  return RunConfig(
      rollout=_from_block(
          RolloutConfig,
          c.rollout,
          max_prompt_len=c.task.max_prompt_len,
          dynamic_sampling=c.rl.dynamic_sampling,
          dynamic_sampling_max_draws=c.rl.dynamic_sampling_max_draws,
          filter_groups_metric=c.rl.filter_groups_metric,
          reward_timeout_s=c.reward.timeout_s,
      ),
      eval=_from_block(
          EvalConfig, c.eval, extra_temperatures=tuple(float(t) for t in c.eval.extra_temperatures)
      ),
      update=_from_block(
          UpdateConfig,
          c.rl,
          loss=loss_config(
              c.loss, selection_shards=shards, max_response_len=c.rollout.max_new_tokens
          ),
          temperature=c.rollout.temperature,
      ),
      optim=_from_block(OptimConfig, c.optim),
      mesh=_from_block(MeshConfig, c.mesh),
  )


def base_config() -> ml_collections.ConfigDict:
  """The embedded default: a tiny policy on a synthetic verifiable task, sized for 2 CPU cores."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_steps = 200
  c.eval_every = 50  # 0 = no evaluation
  c.checkpoint_every = 50
  c.keep_checkpoints = 3
  c.max_nonfinite_steps = 3
  c.distributed = "auto"  # auto | on | off: jax.distributed.initialize() on multi-host launches.

  c.model = ml_collections.ConfigDict()
  c.model.source = "tiny"  # tiny: ModelConfig from the fields below | hf: model.hf_path
  c.model.hf_path = ""
  c.model.hidden_size = 128
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.head_dim = 32
  c.model.intermediate_size = 384
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"
  c.model.remat = False
  c.model.attention_impl = "auto"  # auto (splash on TPU, cuDNN on GPU) | xla | splash | cudnn

  c.task = ml_collections.ConfigDict()
  c.task.source = "synthetic"  # synthetic | jsonl | tfds
  c.task.name = "countdown"
  c.task.path = ""  # jsonl: file; tfds: dataset name
  c.task.split = "train"
  c.task.data_dir = ""  # tfds: TFDS_DATA_DIR
  c.task.question_field = "problem"
  c.task.answer_field = "answer"
  c.task.template = ""  # "" = the tokenizer's chat template (real models) or the task's own
  c.task.answer_format = "auto"  # auto (by file name, else raw) | raw | boxed | gsm8k ('#### N')
  c.task.max_prompt_len = 32
  # The synthetic tasks' difficulty knobs, per task: --config.task.options.countdown.max_target=50
  c.task.options = ml_collections.ConfigDict(
      {
          name: {f.name: f.default for f in dataclasses.fields(cls)}
          for name, cls in tasks_lib.TASKS.items()
      }
  )

  c.reward = ml_collections.ConfigDict()
  c.reward.name = "task"  # task | math | format
  c.reward.timeout_s = 5.0
  c.reward.num_workers = 4
  c.reward.format_coef = 0.0
  c.reward.overlong_buffer = 0  # DAPO overlong shaping: 0 disables
  c.reward.overlong_penalty = 1.0

  c.warm_start = ml_collections.ConfigDict()
  c.warm_start.enabled = True
  c.warm_start.steps = 700
  c.warm_start.batch_size = 128
  c.warm_start.lr = 3e-3
  c.warm_start.corrupt_prob = 0.35
  c.warm_start.seed = 0  # separate from `seed`: RL seeds of an ablation share one starting policy
  c.warm_start.path = ""  # the cache directory; "" = <workdir>/warm_start; runs may share one

  c.rollout = ml_collections.ConfigDict()
  c.rollout.prompts_per_step = 32
  c.rollout.num_samples = 8
  c.rollout.max_new_tokens = 32
  c.rollout.temperature = 1.0
  c.rollout.top_p = 1.0
  c.rollout.top_k = 0
  # Sampler slots (KV cache rows): 0 = every (prompt, sample) pair, -1 = as many as fit in
  # rollout.kv_cache_fraction of a chip's memory (see resolve_rows_in_flight).
  c.rollout.max_rows_in_flight = 0
  c.rollout.kv_cache_fraction = 0.5
  # The prompts' prefill runs in this many chunks (strided, so each spans every device), one after
  # another: the prefill's activations shrink by the factor; its cache is the same.
  c.rollout.prefill_chunks = 1

  c.rl = ml_collections.ConfigDict()
  c.rl.advantage = "grpo"  # grpo | drgrpo | rloo | qae | signed (advantages.ESTIMATORS)
  c.rl.qae_quantile = 0.4  # QAE's K (rl.advantage = 'qae'), in [0, 1]
  c.rl.num_minibatches = 4
  c.rl.num_microbatches = 1  # 0 = derived: rl.microbatch_rows_per_device rows on each device
  c.rl.microbatch_rows_per_device = 1  # with rl.num_microbatches = 0 (see resolve_microbatches)
  c.rl.ppo_epochs = 1
  c.rl.recompute_old_logp = False
  # A non-finite loss, gradient or parameter skips: 'step', the whole step (the state stays as it
  # was; the start state is held through the mini-batches: about twice the state in temporaries),
  # or 'minibatch', that mini-batch only (the finite ones before and after it apply).
  c.rl.skip_nonfinite = "step"
  c.rl.dynamic_sampling = False
  c.rl.dynamic_sampling_max_draws = 3
  c.rl.filter_groups_metric = "acc"  # dynamic sampling drops groups where this agrees (DAPO: acc)
  # Vocabulary columns per chunk of the fused log-prob and entropy pass (`stats`). 512 suits CPUs:
  # bench_update's update takes 0.88-0.91x the time it takes at 4096 (interleaved A/Bs), whose
  # [tokens, 4096] float32 logits chunk leaves the caches. The paper presets (accelerators): 16384.
  c.rl.fused_chunk_size = 512
  # The update's arrays drop the padding every row shares, kept to multiples of this many tokens
  # (few shapes, so few compiles); 0 = always task.max_prompt_len + rollout.max_new_tokens.
  c.rl.length_bucket = 8
  # Pack each micro-batch's rows into as few rows of the same length as fit (`entropy_rl.packing`):
  # the model computes on no padding; worth it when responses are much shorter than the longest.
  c.rl.packing = False

  c.loss = ml_collections.ConfigDict(
      {f.name: f.default for f in dataclasses.fields(LossConfig) if f.name in loss_keys()}
  )

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 5e-5
  c.optim.schedule = "constant"  # constant | cosine
  c.optim.warmup_steps = 10
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.grad_clip = 1.0

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  c.eval = ml_collections.ConfigDict()
  c.eval.num_prompts = 128
  c.eval.num_samples = 16
  c.eval.temperature = 1.0
  c.eval.extra_temperatures = ()  # e.g. (0.6,): avg@k / pass@k at these temperatures too
  c.eval.max_new_tokens = -1  # -1 = rollout.max_new_tokens
  c.eval.data_dir = ""  # real runs: directory holding the benchmark JSONL files
  c.eval.files = ()
  c.eval.at_start = True  # evaluate the starting policy as step 0
  # Rows sampled at once: -1 = as many as a training rollout (never more KV memory), 0 = all.
  c.eval.max_rows_in_flight = -1
  return c


def apply_paper_preset(c: ml_collections.ConfigDict, model: str, paper: str) -> None:
  """The papers' settings for a real model; only paths need editing.

  EM (arXiv 2505.22617): 256 prompts x 8 responses, T = 1, mini-batch 32 prompts, 1 epoch, no KL, no
  entropy loss, constant LR 1e-6 (7B) / 5e-7 (32B), max response 8192. HE (arXiv 2506.01939): the DAPO
  recipe on Qwen3, 512 prompts x 16 responses, mini-batch 32 prompts, dynamic sampling, overlong
  shaping, LR 1e-6, max response 20480. The loss (clip-higher's eps_high = 0.28 for HE's runs) is
  the family's: `configs/top_entropy.py` and `configs/clip_higher.py` set it.
  """
  if model not in PAPER_MODELS:
    raise ValueError(f"unknown preset {model!r}; expected one of {PAPER_MODELS}")
  c.model.source = "hf"
  c.model.hf_path = f"/path/to/{model}"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = True
  c.warm_start.enabled = False
  c.task.source = "jsonl"
  c.task.path = "/path/to/train.jsonl"
  c.task.template = "he"
  c.task.max_prompt_len = 1024
  c.reward.name = "math"
  c.rollout.temperature = 1.0
  c.rl.num_microbatches = 0  # derived from the slice: one sequence per device per micro-batch
  c.rollout.max_rows_in_flight = -1  # derived from the slice: the KV cache takes 30% of a chip
  c.rollout.kv_cache_fraction = 0.3
  c.rl.microbatch_rows_per_device = 1
  c.rl.fused_chunk_size = 16384
  c.rl.length_bucket = 0  # full-length arrays: the shapes `plan` checks, one compile per run
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 1.0
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.eval.data_dir = "/path/to/shared/data"
  c.eval.files = BENCHMARKS
  c.eval.num_prompts = -1
  c.eval.num_samples = 16
  c.eval.max_new_tokens = -1
  c.num_steps = 2400 if paper == "em" else 1000
  c.eval_every = 20
  c.checkpoint_every = 20
  big = model.endswith("32b")
  if paper == "em":
    c.rollout.prompts_per_step = 256
    c.rollout.num_samples = 8
    c.rollout.max_new_tokens = 8192
    c.rl.num_minibatches = 256 // 32
    c.optim.lr = 5e-7 if big else 1e-6
  else:
    c.rollout.prompts_per_step = 512
    c.rollout.num_samples = 16
    c.rollout.max_new_tokens = 20480
    # HE's 512 prompts on a v5p-8 prefill 32 of a chip's 128 at a time (EM's 256 fit at once; on
    # a v5e-64 chunks of 1 prompt a chip would only add weight gathers).
    c.rollout.prefill_chunks = 4
    c.rl.num_minibatches = 512 // 32
    c.rl.dynamic_sampling = True
    c.reward.overlong_buffer = 4096
    c.optim.lr = 1e-6
  c.loss.loss_agg_mode = "token-mean"
  c.rl.skip_nonfinite = "minibatch"  # 8-16 mini-batches: no start state held beside them


def ppo_method(clip_ratio_high: float):
  """GRPO's loss (eps_low = 0.2, dual-clip) with the given eps_high: 0.2 GRPO, 0.28 clip-higher."""

  def method(c, model):
    del model
    c.loss.name = "ppo"
    c.loss.clip_ratio_low = 0.2
    c.loss.clip_ratio_high = clip_ratio_high

  return method


def model_and_variant(arg: str | None, family: str, what: str, variants: tuple) -> tuple:
  """`arg` = 'MODEL[,VARIANT]' of configs/<family>.py split into (model, variant), the variant
  one of `variants` (the first when absent); `what` names it in the error."""
  model, _, variant = (arg or "tiny").partition(",")
  if (variant or variants[0]) not in variants:
    raise ValueError(f"configs/{family}.py:{arg}: {what} {variant!r} not in {variants}")
  return model, variant or variants[0]


def get_config_for(arg: str | None, method) -> ml_collections.ConfigDict:
  """`arg` is '' / 'tiny' (the embedded default) or a paper model (`qwen2_5_7b`, ...)."""
  c = base_config()
  name = arg or "tiny"
  if name != "tiny":
    apply_paper_preset(c, name, "he" if name.startswith("qwen3") else "em")
  method(c, name)
  return c


_CHOICES = {
    "model.source": ("tiny", "hf"),
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.attention_impl": ATTENTION_IMPLS,
    "task.source": ("synthetic", "jsonl", "tfds"),
    "reward.name": rewards.REWARD_NAMES,
    "rl.advantage": advantages.ESTIMATORS,
    "optim.schedule": ("constant", "cosine"),
    "distributed": ("auto", "on", "off"),
    "task.answer_format": ("auto", "raw", "boxed", "gsm8k"),
    "rl.filter_groups_metric": ("acc", "reward"),
    "rl.skip_nonfinite": ("step", "minibatch"),
}
_POSITIVE = (
    "num_steps",
    "rollout.prompts_per_step",
    "rollout.num_samples",
    "rollout.max_new_tokens",
    "rl.num_minibatches",
    "rl.microbatch_rows_per_device",
    "rl.ppo_epochs",
    "optim.lr",
    "eval.num_samples",
    "rl.fused_chunk_size",
    "max_nonfinite_steps",
    "reward.num_workers",
    "checkpoint_every",
    "keep_checkpoints",
    "task.max_prompt_len",
    "reward.timeout_s",
)


def _get(c, dotted):
  for part in dotted.split("."):
    c = c[part]
  return c


def data_parallel_devices(c: ml_collections.ConfigDict, num_devices: int) -> int:
  """mesh.data x mesh.fsdp on `num_devices` devices (a -1 axis takes the remaining devices)."""
  sizes = [c.mesh[a] for a in ("data", "fsdp", "tensor")]
  fixed = math.prod(s for s in sizes if s != -1)
  data, fsdp = (s if s != -1 else num_devices // fixed for s in sizes[:2])
  return data * fsdp


def resolve_microbatches(
    c: ml_collections.ConfigDict, num_devices: int
) -> ml_collections.ConfigDict:
  """`c` as a run on `num_devices` uses it (the trainer and `plan` call this after `validate`):
  rl.num_microbatches = 0 becomes the count that gives each data-parallel device (mesh.data x
  mesh.fsdp) rl.microbatch_rows_per_device sequences per micro-batch."""
  if c.rl.num_microbatches:
    return c
  devices = data_parallel_devices(c, num_devices)
  rows = c.rollout.prompts_per_step * c.rollout.num_samples // c.rl.num_minibatches
  per_micro = c.rl.microbatch_rows_per_device * devices
  if rows % per_micro:
    raise ConfigError(
        f"config.rl.num_microbatches=0 derives micro-batches of config.rl.microbatch_rows_per_device"
        f"={c.rl.microbatch_rows_per_device} sequences on each of {devices} data-parallel "
        f"devices ({per_micro} sequences), which must divide the mini-batch of {rows}; change "
        "config.rl.microbatch_rows_per_device or set config.rl.num_microbatches"
    )
  out = c.copy_and_resolve_references()
  out.rl.num_microbatches = rows // per_micro
  return out


def mesh_sizes(c: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor): config.mesh with its -1 axis resolved for `num_devices`."""
  sizes = [c.mesh[a] for a in ("data", "fsdp", "tensor")]
  fixed = math.prod(s for s in sizes if s != -1)
  data, fsdp, tensor = (s if s != -1 else num_devices // fixed for s in sizes)
  return data, fsdp, tensor


def kv_bytes_per_token(model_cfg) -> int:
  """KV-cache bytes of one token: keys and values of every layer's KV heads, in the compute dtype."""
  itemsize = {"float32": 4, "bfloat16": 2}[model_cfg.dtype]
  return 2 * model_cfg.num_layers * model_cfg.num_kv_heads * model_cfg.head_dim * itemsize


def kv_row_bytes(model_cfg, slots: int, tensor: int) -> int:
  """KV-cache bytes of one sampler row of `slots` slots on each chip holding it: its KV heads are
  split over the `tensor` chips of a tensor-parallel group when they divide (as k_proj's)."""
  split = tensor if model_cfg.num_kv_heads % tensor == 0 else 1
  return kv_bytes_per_token(model_cfg) * slots // split


def rows_for_kv_budget(budget_bytes: float, row_bytes: int, row_shards: int, num_rows: int) -> int:
  """The most sampler rows whose KV cache fits `budget_bytes` per chip when the rows are split
  evenly over `row_shards` devices and each row's cache takes `row_bytes`: a multiple of
  `row_shards`, at most `num_rows` (itself a multiple); 0 when not even one row a shard fits."""
  return min(int(budget_bytes // row_bytes) * row_shards, num_rows)


def resolve_rows_in_flight(
    c: ml_collections.ConfigDict, num_devices: int, model_cfg, memory_bytes: int | None
) -> ml_collections.ConfigDict:
  """`c` with rollout.max_rows_in_flight = -1 replaced by the rows whose KV cache (task.
  max_prompt_len + rollout.max_new_tokens slots a row, `kv_row_bytes` of it a chip) takes at most
  rollout.kv_cache_fraction of `memory_bytes` (one device's memory: its
  `memory_stats()['bytes_limit']`, or the chip's HBM in `plan`) on each chip; the rows split over
  the data-parallel devices. The trainer and `plan` call this after `validate`."""
  if c.rollout.max_rows_in_flight != -1:
    return c
  fraction = c.rollout.kv_cache_fraction
  if not memory_bytes:
    raise ConfigError(
        "config.rollout.max_rows_in_flight=-1 derives the sampler's rows from "
        f"config.rollout.kv_cache_fraction={fraction} of a device's memory, but these devices do "
        "not report theirs; set config.rollout.max_rows_in_flight"
    )
  data, fsdp, tensor = mesh_sizes(c, num_devices)
  shards = data * fsdp
  slots = c.task.max_prompt_len + c.rollout.max_new_tokens
  row_bytes = kv_row_bytes(model_cfg, slots, tensor)
  n = c.rollout.prompts_per_step * c.rollout.num_samples
  rows = rows_for_kv_budget(fraction * memory_bytes, row_bytes, shards, n)
  if not rows:
    raise ConfigError(
        f"config.rollout.kv_cache_fraction={fraction} of {memory_bytes / 2**30:.2f} GiB holds no "
        f"sampler row ({row_bytes / 2**30:.3f} GiB of KV cache a chip: {c.task.max_prompt_len} + "
        f"{c.rollout.max_new_tokens} slots) on each of the {shards} data-parallel devices; raise "
        "it, shorten the rows or set config.rollout.max_rows_in_flight"
    )
  out = c.copy_and_resolve_references()
  out.rollout.max_rows_in_flight = rows
  return out


def validate(c: ml_collections.ConfigDict, num_devices: int) -> None:
  """Fails with one message naming the key, before any compilation."""
  for key, choices in _CHOICES.items():
    if _get(c, key) not in choices:
      raise ConfigError(f"config.{key}={_get(c, key)!r}: expected one of {choices}")
  for key in _POSITIVE:
    if not _get(c, key) > 0:
      raise ConfigError(f"config.{key}={_get(c, key)!r}: must be positive")
  if not 0 <= c.rl.qae_quantile <= 1:
    raise ConfigError(f"config.rl.qae_quantile={c.rl.qae_quantile}: must be in [0, 1]")
  for t in c.eval.extra_temperatures:
    if not (_is_real(t) and t > 0):
      raise ConfigError(
          f"config.eval.extra_temperatures={tuple(c.eval.extra_temperatures)!r}: each must be a "
          "positive number"
      )
  if c.eval.max_rows_in_flight < -1:
    raise ConfigError(
        f"config.eval.max_rows_in_flight={c.eval.max_rows_in_flight}: must be >= -1 "
        "(-1 = as many as a training rollout, 0 = all at once)"
    )
  if c.eval_every < 0:
    raise ConfigError(f"config.eval_every={c.eval_every}: must be >= 0 (0 = no evaluation)")
  if c.rl.length_bucket < 0:
    raise ConfigError(
        f"config.rl.length_bucket={c.rl.length_bucket}: must be >= 0 (0 = no trimming)"
    )
  _validate_task(c)
  if c.rollout.temperature <= 0:
    raise ConfigError(f"config.rollout.temperature={c.rollout.temperature}: must be positive")
  if not 0 < c.rollout.top_p <= 1:
    raise ConfigError(f"config.rollout.top_p={c.rollout.top_p}: must be in (0, 1]")
  if c.rollout.max_rows_in_flight < -1:
    raise ConfigError(
        f"config.rollout.max_rows_in_flight={c.rollout.max_rows_in_flight}: must be "
        f">= -1 (0 = all rows at once, -1 = derived from config.rollout.kv_cache_fraction)"
    )
  chunks = c.rollout.prefill_chunks
  if not isinstance(chunks, int) or chunks < 1 or c.rollout.prompts_per_step % chunks:
    raise ConfigError(
        f"config.rollout.prefill_chunks={chunks!r}: must be a positive int that divides "
        f"config.rollout.prompts_per_step={c.rollout.prompts_per_step}"
    )
  if not 0 < c.rollout.kv_cache_fraction < 1:
    raise ConfigError(
        f"config.rollout.kv_cache_fraction={c.rollout.kv_cache_fraction}: must be in (0, 1) "
        "(the fraction of a chip's memory the sampler's KV cache may take)"
    )
  try:
    loss_config(c.loss)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  n = c.rollout.prompts_per_step * c.rollout.num_samples
  mb = c.rl.num_minibatches
  if c.rollout.prompts_per_step % mb:
    raise ConfigError(
        f"config.rl.num_minibatches={mb} must divide config.rollout.prompts_per_step="
        f"{c.rollout.prompts_per_step} (a mini-batch holds whole groups)"
    )
  micro = c.rl.num_microbatches
  if micro < 0 or (micro and (n // mb) % micro):
    raise ConfigError(
        f"config.rl.num_microbatches={micro} must divide the mini-batch of "
        f"{n // mb} sequences (or be 0: derived from the slice)"
    )
  sizes = {a: c.mesh[a] for a in ("data", "fsdp", "tensor")}
  rest = [a for a, s in sizes.items() if s == -1]
  if len(rest) > 1:
    raise ConfigError(f"config.mesh: at most one axis may be -1, got {rest}")
  fixed = 1
  for a, s in sizes.items():
    if s != -1 and s < 1:
      raise ConfigError(f"config.mesh.{a}={s}: must be positive or -1")
    fixed *= s if s != -1 else 1
  if num_devices % fixed or (not rest and fixed != num_devices):
    raise ConfigError(f"config.mesh={sizes} does not fit {num_devices} devices")
  batch_shards = (sizes["data"] if sizes["data"] != -1 else num_devices // fixed) * (
      sizes["fsdp"] if sizes["fsdp"] != -1 else num_devices // fixed
  )
  if c.rollout.prompts_per_step % batch_shards:
    raise ConfigError(
        f"config.rollout.prompts_per_step={c.rollout.prompts_per_step} must be a "
        f"multiple of the {batch_shards} data-parallel devices (config.mesh.data x "
        "config.mesh.fsdp): prompts are sharded over them"
    )
  micro = micro or resolve_microbatches(c, num_devices).rl.num_microbatches
  if (n // mb // micro) % batch_shards:
    raise ConfigError(
        f"config.rl.num_microbatches={micro}: a micro-batch of {n // mb // micro} "
        f"sequences does not split over {batch_shards} data-parallel devices "
        "(config.mesh.data x config.mesh.fsdp)"
    )
  if c.model.source == "hf" and not c.model.hf_path:
    raise ConfigError("config.model.hf_path: required when config.model.source='hf'")
  if c.task.source in ("jsonl", "tfds") and not c.task.path:
    raise ConfigError(f"config.task.path: required when config.task.source={c.task.source!r}")
  if c.warm_start.enabled and c.task.source != "synthetic":
    raise ConfigError(
        "config.warm_start.enabled: the warm start trains on synthetic "
        "demonstrations; disable it for config.task.source="
        f"{c.task.source!r}"
    )
  if c.reward.name == "task" and c.task.source != "synthetic":
    raise ConfigError("config.reward.name='task' needs config.task.source='synthetic'; use 'math'")
  if c.loss.kl_ref_coef < 0 or c.loss.entropy_coef < 0:
    raise ConfigError("config.loss.kl_ref_coef and config.loss.entropy_coef must be >= 0")


def _validate_task(c) -> None:
  if c.task.source == "synthetic":
    if c.task.name not in tasks_lib.TASKS:
      raise ConfigError(
          f"config.task.name={c.task.name!r}: expected one of {sorted(tasks_lib.TASKS)}"
      )
    try:
      tasks_lib.get_task(c.task.name, **c.task.options[c.task.name])
    except (TypeError, ValueError) as e:
      raise ConfigError(f"config.task.options.{c.task.name}: {e}") from None
    return
  if c.model.source == "tiny" and not c.task.template:
    raise ConfigError(
        "config.task.template is empty, which means the tokenizer's chat template, but the tiny "
        "model's character tokenizer has none: set config.task.template to 'he', 'instruction', "
        "'plain' or a str.format string with {question}"
    )


def check_inputs(c) -> None:
  """The files the config names exist (run before anything slow, such as loading weights)."""
  if c.task.source == "jsonl" and not fileio.exists(c.task.path):
    raise ConfigError(f"config.task.path={c.task.path!r}: no such file")
  if c.model.source == "hf" and not fileio.exists(c.model.hf_path):
    raise ConfigError(f"config.model.hf_path={c.model.hf_path!r}: no such directory")
  for name in c.eval.files:
    path = fileio.join(c.eval.data_dir, name)
    if not fileio.exists(path):
      raise ConfigError(
          f"config.eval.files: {path} does not exist (config.eval.data_dir=" f"{c.eval.data_dir!r})"
      )
