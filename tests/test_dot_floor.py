"""experiments/dot_floor.py: dots counted as often as the compiled program runs them, and timed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from entropy_rl import step as step_lib
from experiments import dot_floor


def _compiled_text(f, *args):
  return jax.jit(f).lower(*args).compile().as_text()


def test_dots_in_loops_count_their_trips():
  x = jnp.ones((16, 8), jnp.float32)
  w = jnp.full((8, 8), 0.1, jnp.float32)
  v = jnp.full((8, 4), 0.1, jnp.float32)

  def f(x, w, v):
    def inner(_, h):
      return jnp.tanh(h @ w)

    def outer(_, h):
      return jax.lax.fori_loop(0, 2, inner, jnp.sin(h))

    h = jax.lax.fori_loop(0, 3, outer, x)  # 6 executions of the [16, 8] x [8, 8] dot
    return jnp.tanh(h) @ v  # 1 of the [16, 8] x [8, 4] dot

  dots = dot_floor.module_dots(_compiled_text(f, x, w, v))
  counts = {(d.lhs, d.rhs): n for d, n in dots.items()}
  assert counts == {((16, 8), (8, 8)): 6, ((16, 8), (8, 4)): 1}


def test_batched_dot_dims_and_flops():
  q = jnp.ones((2, 3, 5, 4), jnp.float32)
  k = jnp.ones((2, 3, 7, 4), jnp.float32)
  dots = dot_floor.module_dots(
      _compiled_text(lambda q, k: jnp.einsum("bhqd,bhkd->bhqk", q, k), q, k)
  )
  ((dot, n),) = dots.items()
  assert n == 1 and dot.lhs_contract == (3,) and dot.rhs_contract == (3,)
  assert dot.lhs_batch == (0, 1) == dot.rhs_batch
  assert dot.flops == 2 * 2 * 3 * 5 * 7 * 4  # one multiply-add per (b, h, q, k, d)


def test_time_dots_floor_is_count_times_each():
  d1 = dot_floor.Dot((64, 32), (32, 16), (), (), (1,), (0,))
  d2 = dot_floor.Dot((32, 64), (32, 16), (), (), (0,), (0,))
  rows, floor = dot_floor.time_dots({d1: 3, d2: 1}, reps=3)
  assert {r["dot"] for r in rows} == {d1, d2}
  assert np.isclose(floor, sum(r["count"] * r["seconds"] for r in rows))
  assert all(r["seconds"] > 0 and r["flops_per_s"] > 0 for r in rows)
  totals = [r["count"] * r["seconds"] for r in rows]
  assert totals == sorted(totals, reverse=True)
  assert "| 3 | [64, 32] | [32, 16] | [1]/[0] |" in dot_floor.format_rows(rows)
  # Timed as the update compiles them on CPU (Eigen dots).
  rows, floor = dot_floor.time_dots({d1: 2}, 3, step_lib.CPU_UPDATE_COMPILER_OPTIONS)
  assert rows[0]["count"] == 2 and floor == 2 * rows[0]["seconds"] > 0


def test_no_entry_raises():
  with pytest.raises(ValueError, match="ENTRY"):
    dot_floor.module_dots("HloModule empty\n")


def test_loop_time_dot_times_one_execution():
  dot = dot_floor.Dot((64, 256), (256, 512), (), (), (1,), (0,))
  short, long = dot_floor.loop_time_dot(dot, n=64), dot_floor.loop_time_dot(dot, n=512)
  assert short > 0 and 0.25 < short / long < 4  # per execution: a per-loop time would be 8x apart
