"""plan: TPU slices from libtpu, loop-aware compiled costs, the pre-flight table and its verdict."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from entropy_rl import config_lib, models, plan, sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "name, generation, shape",
    [
        ("v4-32", "v4", "2x2x4"),
        ("v5litepod-64", "v5e", "8x8"),
        ("v5e-64", "v5e", "8x8"),
        ("v5p-64", "v5p", "2x4x4"),
        ("v6e-16", "v6e", "4x4"),
        ("v5p:4x4x2", "v5p", "4x4x2"),
        ("v5e:2x4", "v5e", "2x4"),
    ],
)
def test_parse_topology(name, generation, shape):
  topo = plan.parse_topology(name)
  assert (topo.generation, topo.shape) == (generation, shape)


@pytest.mark.parametrize("name", ["v5p-63", "v7-8", "v5p:4x", "tpu"])
def test_parse_topology_rejects_names_it_cannot_map(name):
  with pytest.raises(ValueError, match="--topology"):
    plan.parse_topology(name)


def test_hlo_costs_count_every_loop_iteration():
  def f(w_KxK, x_MxK):
    return jax.lax.scan(lambda x, _: (jnp.tanh(x @ w_KxK), None), x_MxK, None, length=10)[0]

  compiled = jax.jit(f).lower(jnp.zeros((64, 64)), jnp.zeros((32, 64))).compile()
  costs = plan.hlo_costs(compiled.as_text())
  assert costs.flops == 10 * 2 * 32 * 64 * 64
  assert costs.unknown_trip_counts == 0
  assert compiled.cost_analysis()["flops"] < costs.flops / 5  # XLA counts the body once
  assert costs.hbm_bytes >= 10 * 4 * (32 * 64 * 2 + 64 * 64)


def _nested_scans(w_LxKxK, x_AxBxMxK):
  """Mini-batches (A) of micro-batches (B) through L layers, as the update nests its scans."""

  def minibatch(total, x_BxMxK):
    def microbatch(total, x_MxK):
      h_MxK, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x_MxK, w_LxKxK)
      return total + h_MxK.sum(), None

    return jax.lax.scan(microbatch, total, x_BxMxK)[0], None

  return jax.lax.scan(minibatch, 0.0, x_AxBxMxK)[0]


def test_hlo_costs_multiply_the_trip_counts_of_nested_scans():
  w, x = jnp.zeros((7, 64, 64)), jnp.zeros((3, 5, 32, 64))
  costs = plan.hlo_costs(jax.jit(_nested_scans).lower(w, x).compile().as_text())
  assert costs.flops == 3 * 5 * 7 * 2 * 32 * 64 * 64
  assert costs.unknown_trip_counts == 0


def test_hlo_costs_count_the_slice_a_loop_reads_of_stacked_layers():
  """Twice the layers is twice the bytes: each iteration reads its layer, not the whole stack."""

  def hbm_bytes(layers):
    w, x = jnp.zeros((layers, 64, 64)), jnp.zeros((3, 5, 32, 64))
    return plan.hlo_costs(jax.jit(_nested_scans).lower(w, x).compile().as_text()).hbm_bytes

  assert hbm_bytes(14) < 2.05 * hbm_bytes(7)


def test_hlo_costs_take_the_trip_count_from_the_counter_start_step_and_bound():
  def f(w_KxK, x_MxK):  # the counter runs 2, 5, 8: three iterations, though the bound is 11
    return jax.lax.while_loop(
        lambda s: s[0] < 11, lambda s: (s[0] + 3, jnp.tanh(s[1] @ w_KxK)), (2, x_MxK)
    )[1]

  costs = plan.hlo_costs(
      jax.jit(f).lower(jnp.zeros((64, 64)), jnp.zeros((32, 64))).compile().as_text()
  )
  assert costs.flops == 3 * 2 * 32 * 64 * 64
  assert costs.unknown_trip_counts == 0


def test_hlo_costs_of_fsdp_matmuls_inside_nested_scans_on_a_pod():
  """XLA:TPU turns an FSDP matmul into a windowed loop (two weight shards an iteration, counter
  step 2) of padded convolutions; the per-chip FLOPs must still be the hand count."""
  pytest.importorskip("libtpu")
  from jax.sharding import NamedSharding, PartitionSpec as P

  devices = plan.topology_devices(plan.parse_topology("v5p-64"))
  mesh = jax.sharding.Mesh(devices, ("fsdp",))
  rows = NamedSharding(mesh, P("fsdp"))
  a, b, layers, r, t, k, h, d = 3, 2, 2, 32, 256, 512, 4, 128

  def f(wq_LxKxHxD, wo_LxHxDxK, x_AxBxRxTxK):
    def layer(x_RxTxK, w):
      q_RxTxHxD = jax.lax.with_sharding_constraint(jnp.einsum("rtk,khd->rthd", x_RxTxK, w[0]), rows)
      return (
          jax.lax.with_sharding_constraint(
              jnp.tanh(jnp.einsum("rthd,hdk->rtk", q_RxTxHxD, w[1])), rows
          ),
          None,
      )

    def minibatch(total, x_BxRxTxK):
      def microbatch(total, x_RxTxK):
        out, _ = jax.lax.scan(layer, x_RxTxK, (wq_LxKxHxD, wo_LxHxDxK))
        return total + out.astype(jnp.float32).sum(), None

      return jax.lax.scan(microbatch, total, x_BxRxTxK)[0], None

    return jax.lax.scan(minibatch, 0.0, x_AxBxRxTxK)[0]

  def arg(shape, spec):
    return jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, spec))

  text = (
      jax.jit(f)
      .lower(
          arg((layers, k, h, d), P(None, "fsdp")),
          arg((layers, h, d, k), P(None, None, None, "fsdp")),
          arg((a, b, r, t, k), P(None, None, "fsdp")),
      )
      .compile()
      .as_text()
  )
  assert "windowed_dot_general" in text and "pad=" in text  # the case this test is about
  costs = plan.hlo_costs(text)
  assert costs.flops == a * b * layers * 2 * (2 * r * t * k * h * d) / len(devices)
  assert costs.unknown_trip_counts == 0


def _tiny_config():
  c = config_lib.get_config_for("tiny", config_lib.ppo_method(0.2))
  c.rollout.prompts_per_step, c.rollout.num_samples = 8, 2
  c.task.max_prompt_len, c.rollout.max_new_tokens = 16, 24
  c.rl.num_minibatches, c.rl.num_microbatches = 1, 2
  c.mesh.data, c.mesh.fsdp = 1, -1
  return c


def _collectives_of_layer_activations(hlo_text: str, seq_len: int) -> list[str]:
  """All-gathers / all-reduces inside the decoder layers of float arrays with a token dimension
  (the sequence, or rows x sequence)."""
  found = []
  for line in hlo_text.splitlines():
    inst = plan._split_instruction(line)
    if not inst or inst[2].removesuffix("-start") not in ("all-gather", "all-reduce"):
      continue
    op_name = re.search(r'op_name="([^"]*)"', line)
    if not op_name or "layers/" not in op_name.group(1):
      continue
    for dtype, dims in plan._ARRAY.findall(inst[1]):
      if dtype in ("bf16", "f32") and any(int(d) % seq_len == 0 for d in dims.split(",") if d):
        found.append(f"{inst[2]} {dtype}[{dims}] at {op_name.group(1)}")
  return found


def test_update_under_the_mesh_gathers_weights_not_activations():
  pytest.importorskip("libtpu")
  c = _tiny_config()
  cfg = models.ModelConfig(
      vocab_size=512,
      hidden_size=256,
      intermediate_size=512,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      head_dim=64,
      dtype="bfloat16",
  )
  devices = plan.topology_devices(plan.parse_topology("v5p-16"))
  assert len({d.process_index for d in devices}) == 2
  mesh = sharding.make_mesh(1, -1, 1, devices=devices)
  (update,) = plan.training_programs(c, mesh, cfg)
  assert "all-gather" in update.hlo_text  # FSDP: the layers' weights are gathered
  assert _collectives_of_layer_activations(update.hlo_text, seq_len=16 + 24) == []


def test_plan_single_host_names_the_fields_when_it_does_not_fit():
  pytest.importorskip("libtpu")
  result = plan.plan(
      config_lib.get_config_for("tiny", config_lib.ppo_method(0.2)), "v5p-8", headroom=0.99999
  )
  assert (result.hosts, result.rows_per_host) == (1, 32)
  update = result.programs[0]  # then the sampler's (tests/test_plan_rollout.py)
  assert update.name == "update"
  assert 0 < update.argument_bytes < update.peak_bytes
  assert update.costs.flops > 0 and update.costs.unknown_trip_counts == 0
  assert len(result.problems) == len(result.programs)  # nothing fits in 0.001% of HBM
  assert "update needs" in result.problems[0]
  assert "config.rl.num_microbatches=1 -> 2" in result.problems[0]


def test_plan_cli_on_a_multi_host_slice():
  pytest.importorskip("libtpu")
  out = subprocess.run(
      [
          sys.executable,
          "-m",
          "entropy_rl.plan",
          "--config=configs/grpo.py",
          "--topology=v5p-16",
          "--config.mesh.data=1",
          "--config.mesh.fsdp=-1",
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "over 2 hosts; each host feeds 16 of 32 prompts" in out.stdout
  assert re.search(r"^update +1 +[\d.]+ +[\d.]+ +[\d.]+ +95 ", out.stdout, re.M), out.stdout
  assert "MFU bound" in out.stdout


@pytest.mark.parametrize("devices, micro", [(16, 16), (32, 8), (64, 4)])
def test_the_em_preset_derives_its_micro_batches_from_the_slice(devices, micro):
  c = config_lib.get_config_for("qwen2_5_7b", config_lib.ppo_method(0.2))
  config_lib.validate(c, devices)
  assert config_lib.resolve_microbatches(c, devices).rl.num_microbatches == micro
  assert c.rl.num_microbatches == 0  # the config itself is left as written


def test_derived_micro_batches_that_do_not_divide_the_mini_batch_name_the_fields():
  c = config_lib.get_config_for("qwen2_5_7b", config_lib.ppo_method(0.2))
  c.rl.microbatch_rows_per_device = 3
  with pytest.raises(
      config_lib.ConfigError, match=r"config.rl.microbatch_rows_per_device=3 .* of 32 data-parallel"
  ):
    config_lib.validate(c, 32)


def test_plan_reports_a_program_xla_refuses_for_want_of_hbm():
  pytest.importorskip("libtpu")
  c = _tiny_config()
  c.rollout.max_new_tokens, c.rl.num_microbatches = 16384, 1  # fp32 scores of 8 rows, T = 16k
  c.model.attention_impl = "xla"
  result = plan.plan(c, "v5e-4")
  update = result.programs[0]
  assert update.name == "update" and not update.compiled and update.temp_bytes > 16 * plan.GiB
  assert "XLA:TPU refused it" in result.report
  assert len(result.problems) == 1 and "config.rl.num_microbatches=1 -> 2" in result.problems[0]


def test_plan_names_the_fields_when_xla_refuses_a_program_for_another_reason(monkeypatch):
  """libtpu refuses some collectives on some slices (qwen2_5_7b on v5e-64 as derived: "Failed to
  create limited ICI routing replica info table"): `plan` says which program, on which slice, and
  the fields that shape its collectives, instead of the compiler's traceback."""
  pytest.importorskip("libtpu")

  class Refused:

    def compile(self):
      raise jax.errors.JaxRuntimeError(
          "INTERNAL: Failed to create limited ICI routing replica info table\n(traceback)"
      )

  real = plan.compile_program
  monkeypatch.setattr(plan, "compile_program", lambda name, lowered, *a: real(name, Refused(), *a))
  c = config_lib.get_config_for("tiny", config_lib.ppo_method(0.2))
  c.rl.num_microbatches, c.rl.microbatch_rows_per_device = 0, 1  # derived: one row per device
  with pytest.raises(plan.CompileError) as e:
    plan.plan(c, "v5p-8")
  assert str(e.value) == (
      "XLA:TPU cannot compile the update program: INTERNAL: Failed to create limited ICI routing "
      "replica info table on v5p-8. Fields that shape it: config.rl.microbatch_rows_per_device=1 "
      "(try 2): 16 micro-batches of 4 rows; config.mesh.data=4, config.mesh.fsdp=1, "
      "config.mesh.tensor=1"
  )


def test_splash_attention_saves_the_update_the_fp32_scores():
  """The same update on TPU with XLA's attention and with the splash kernel ('auto' on TPU):
  T = 2,048, 2 rows per chip, 4 heads: XLA's fp32 scores (8 query blocks: 9/16 of [heads, T, T])
  and their gradients are most of its temporaries (1.14 GiB; splash's 0.40 GiB)."""
  pytest.importorskip("libtpu")
  c = _tiny_config()
  c.rollout.max_new_tokens, c.rl.num_microbatches = 2048 - 16, 1
  devices = plan.topology_devices(plan.parse_topology("v5e-4"))
  mesh = sharding.make_mesh(1, -1, 1, devices=devices)
  temps = {}
  for impl in ("xla", "auto"):
    c.model.attention_impl = impl
    (update,) = plan.training_programs(c, mesh, plan.model_config(c))
    temps[impl] = update.temp_bytes
  assert temps["xla"] > 2.5 * temps["auto"], {k: v / 2**20 for k, v in temps.items()}
