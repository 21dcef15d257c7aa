"""plan's sampler programs (training rollout and evaluation) and the KV budget of the rows in
flight."""

import math

import jax
import pytest

from entropy_rl import config_lib, models, plan, sampling
from tests import tiny

GiB = 2**30
QWEN2_5_7B = models.ModelConfig(**plan.PAPER_ARCHITECTURES["qwen2_5_7b"], dtype="bfloat16")


def test_kv_bytes_per_token_counts_keys_and_values_of_every_layer():
  assert config_lib.kv_bytes_per_token(QWEN2_5_7B) == 2 * 28 * 4 * 128 * 2


def test_kv_row_bytes_split_over_tensor_parallel_chips_when_the_heads_divide():
  per_token = 2 * 28 * 4 * 128 * 2
  assert config_lib.kv_row_bytes(QWEN2_5_7B, 100, 1) == 100 * per_token
  assert config_lib.kv_row_bytes(QWEN2_5_7B, 100, 4) == 100 * per_token // 4  # 1 head a chip
  assert config_lib.kv_row_bytes(QWEN2_5_7B, 100, 8) == 100 * per_token  # 4 heads: replicated


@pytest.mark.parametrize(
    "budget, row_bytes, shards, num_rows, rows",
    [
        (10.0, 3, 4, 100, 12),  # 3 rows a shard
        (9.0, 3, 4, 100, 12),  # exactly 3
        (8.99, 3, 4, 100, 8),
        (1e9, 3, 4, 100, 100),  # capped at the pairs
        (2.0, 3, 4, 100, 0),  # not one row a shard
    ],
)
def test_rows_for_kv_budget(budget, row_bytes, shards, num_rows, rows):
  assert config_lib.rows_for_kv_budget(budget, row_bytes, shards, num_rows) == rows


def _em_7b(**rollout):
  c = config_lib.get_config_for("qwen2_5_7b", config_lib.ppo_method(0.2))
  c.rollout.max_rows_in_flight = -1
  c.rollout.update(rollout)
  return c


def test_rows_in_flight_derived_from_the_kv_budget():
  c = _em_7b(kv_cache_fraction=0.5)
  config_lib.validate(c, 16)
  out = config_lib.resolve_rows_in_flight(c, 16, QWEN2_5_7B, 95 * GiB)
  row_bytes = 57344 * (1024 + 8192)  # 0.49 GiB
  assert 0.5 * 95 * GiB // row_bytes == 96  # rows a chip
  assert out.rollout.max_rows_in_flight == 96 * 16  # of 256 x 8 pairs
  assert c.rollout.max_rows_in_flight == -1  # the config itself is left as written
  c.mesh.fsdp, c.mesh.tensor = 4, 4  # 4 row shards, each row's 4 KV heads over 4 chips
  tensor_parallel = config_lib.resolve_rows_in_flight(c, 16, QWEN2_5_7B, 95 * GiB)
  assert 0.5 * 95 * GiB // (row_bytes // 4) == 386
  assert tensor_parallel.rollout.max_rows_in_flight == 386 * 4
  explicit = _em_7b(max_rows_in_flight=64)
  assert config_lib.resolve_rows_in_flight(explicit, 16, QWEN2_5_7B, None) is explicit


def test_a_kv_budget_of_no_row_names_the_fraction():
  c = _em_7b(kv_cache_fraction=0.02)  # 0.32 GiB of a 16 GiB chip; a row takes 0.49
  with pytest.raises(config_lib.ConfigError, match=r"config.rollout.kv_cache_fraction=0.02 .*no"):
    config_lib.resolve_rows_in_flight(c, 64, QWEN2_5_7B, 16 * GiB)
  with pytest.raises(config_lib.ConfigError, match="set config.rollout.max_rows_in_flight"):
    config_lib.resolve_rows_in_flight(_em_7b(), 64, QWEN2_5_7B, None)


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_rows_in_flight", -2),
        ("kv_cache_fraction", 0.0),
        ("kv_cache_fraction", 1.0),
        ("prefill_chunks", 0),
        ("prefill_chunks", 3),
    ],
)
def test_validate_names_the_rollout_memory_fields(field, value):
  c = _em_7b(**{field: value})
  with pytest.raises(config_lib.ConfigError, match=f"config.rollout.{field}"):
    config_lib.validate(c, 16)


def test_decode_steps():
  assert plan.decode_steps(16, 24, 16) == 23
  assert plan.decode_steps(32, 24, 12) == math.ceil(32 * 23 / 12)


def _tiny():
  c = config_lib.get_config_for("tiny", config_lib.ppo_method(0.2))
  c.rollout.prompts_per_step, c.rollout.num_samples = 8, 2
  c.task.max_prompt_len, c.rollout.max_new_tokens = 16, 24
  c.rl.num_minibatches, c.rl.num_microbatches = 1, 2
  c.mesh.data, c.mesh.fsdp = 1, -1
  c.eval.num_samples = 4
  return c


@pytest.fixture(scope="module", params=["v5e-4", "v5p-16"])
def tiny_plan(request):
  """A tiny policy planned on one host (v5e-4) and two (v5p-16), 8 KV rows in flight."""
  pytest.importorskip("libtpu")
  jax.config.update("jax_threefry_partitionable", True)
  c = _tiny()
  c.rollout.max_rows_in_flight = 8
  return c, plan.plan(c, request.param)


def test_plan_compiles_the_rollout_and_evaluation_programs(tiny_plan):
  c, result = tiny_plan
  programs = {p.name: p for p in result.programs}
  assert list(programs) == [
      "update",
      "weights",
      "prefill",
      "decode",
      "eval-prefill",
      "eval-decode",
  ]
  assert result.problems == []
  model_cfg = plan.model_config(c)
  chips = result.topology.num_chips
  params = jax.eval_shape(lambda: models.init_params(model_cfg, jax.random.key(0)))
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  # The trainer holds its float32 weights and two Adam moments (sharded over every chip).
  held = programs["decode"].held_bytes
  assert 3 * 4 * n_params / chips <= held <= 1.1 * 3 * 4 * n_params / chips + 4096
  assert programs["weights"].held_bytes < held
  row_bytes = config_lib.kv_bytes_per_token(model_cfg) * (16 + 24)
  for name, rows, g in (("decode", 8, 2), ("eval-decode", 8, 4)):
    p = programs[name]
    assert p.compiled  # (XLA may write a tiny model's matrix-vector products without dots)
    assert p.calls == plan.decode_steps(8 * g, 24, rows)
    kv_per_chip = rows * row_bytes / chips
    # The decode state (its KV cache of `rows` rows included) is an argument, updated in place.
    assert p.argument_bytes >= kv_per_chip
    assert p.alias_bytes >= kv_per_chip
    assert p.peak_bytes >= held + p.argument_bytes
    # One step reads the chip's shard of every (float32) serving weight, none gathered
    # (weight-stationary decoding), and the chip's KV rows: the memory-bound roofline; the
    # compiled step moves at least that.
    assert 4 * n_params / chips + kv_per_chip <= p.costs.hbm_bytes < 4 * n_params + kv_per_chip
    assert p.counted_hbm_bytes >= p.costs.hbm_bytes
    assert p.seconds(result.topology.chip) > 0
  for name in ("prefill", "eval-prefill"):
    assert programs[name].compiled and programs[name].costs.flops > 0
  assert "decode: 8 of 16 rows in flight, 46 steps;" in result.report
  assert "eval-decode: 8 of 32 rows in flight, 92 steps;" in result.report
  assert "eval chunk" in result.report


def test_rollout_advice_names_the_rows_in_flight(tiny_plan):
  c, result = tiny_plan
  decode = next(p for p in result.programs if p.name == "decode")
  chips = result.topology.num_chips
  model_cfg = plan.model_config(c)
  limit = decode.peak_bytes - 1
  hbm = result.topology.chip.hbm_bytes
  c = config_lib.resolve_microbatches(c, result.topology.num_chips)
  run = config_lib.typed(c, chips)
  if chips == 8:  # v5p-16: the 8 rows are one per data shard, so there are none to take away
    text = plan.rollout_advice(c, run, decode, limit, model_cfg, chips, False, hbm)
    assert "nothing the rows in flight can fix: 1 row(s) per data shard" in text
    assert "->" not in text
    return
  text = plan.rollout_advice(c, run, decode, limit, model_cfg, chips, False, hbm)
  assert "decode needs" in text and "config.rollout.max_rows_in_flight=8 -> " in text
  derived = plan.rollout_advice(c, run, decode, limit, model_cfg, chips, True, hbm)
  assert "config.rollout.kv_cache_fraction=0.5 -> " in derived
  eval_decode = next(p for p in result.programs if p.name == "eval-decode")
  text = plan.rollout_advice(
      c, run, eval_decode, eval_decode.peak_bytes - 1, model_cfg, chips, False, hbm
  )
  assert "config.eval.max_rows_in_flight=-1 -> " in text
  # More over than all rows' KV cache: no field can fix it, so none is named (never "-> 0").
  text = plan.rollout_advice(c, run, decode, 0.0, model_cfg, chips, True, hbm)
  assert "2 row(s) per data shard" in text
  assert "nothing the rows in flight can fix" in text and "use a larger slice" in text
  assert "->" not in text


def test_sampler_programs_match_what_sample_runs():
  """`sampling.programs` holds the settings `sample` would use for the same arguments."""
  cfg = tiny.model_config()
  prompt = jax.ShapeDtypeStruct((3, 5), jax.numpy.int32)
  params = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))
  model = models.Decoder(cfg)
  progs = sampling.programs(model, params, prompt, prompt, num_samples=4, max_new_tokens=6)
  assert progs.rows_in_flight == 12
  progs = sampling.programs(
      model, params, prompt, prompt, num_samples=4, max_new_tokens=6, max_rows_in_flight=5
  )
  assert progs.rows_in_flight == 5


def test_the_trainer_reads_no_memory_limit_from_cpu_devices():
  """CPU devices report no memory, so rollout.max_rows_in_flight=-1 fails there with the
  ConfigError above (test_a_kv_budget_of_no_row_names_the_fraction) instead of guessing."""
  from entropy_rl import distributed

  assert jax.default_backend() != "cpu" or distributed.device_memory() is None


def test_decode_moves_activations_not_weights(tiny_plan):
  """Weight-stationary decoding (`sharding.decode_rules`) and shard-local refills: a decode step
  all-gathers neither the serving weights nor the prompts' KV cache (before, it gathered every
  layer's weights and every prompt's cache rows), at most a few activations, whatever the slice."""
  c, result = tiny_plan
  model_cfg = plan.model_config(c)
  params = jax.eval_shape(lambda: models.init_params(model_cfg, jax.random.key(0)))
  layer_bytes = 4 * sum(math.prod(x.shape) for x in jax.tree.leaves(params["layers"]))
  layer_bytes //= model_cfg.num_layers
  prompt_cache_bytes = 8 * config_lib.kv_bytes_per_token(model_cfg) * 16  # 8 prompts x 16 slots
  for name in ("decode", "eval-decode"):
    hlo = next(p for p in result.programs if p.name == name).hlo_text
    gathered = 0
    for line in hlo.splitlines():
      inst = plan._split_instruction(line)
      if inst and inst[2].removesuffix("-start") == "all-gather":
        for dtype, dims in plan._ARRAY.findall(inst[1]):
          size = math.prod(int(d) for d in dims.split(",") if d)
          gathered += size * {"bf16": 2, "f32": 4}.get(dtype, 0)
    assert gathered < min(layer_bytes, prompt_cache_bytes) / 10, (gathered, layer_bytes)
