"""The floor a program's dots set on its time: every dot of a compiled XLA module, timed alone.

`module_dots(hlo_text)` reads the optimised HLO (`jax.jit(f).lower(...).compile().as_text()`) and
counts each float32 dot (operand shapes, batch and contracting dimensions) as often as it
executes: a dot in a while body counts the loop's known trip count times, nested loops multiply,
and a fusion or call counts once per call. `time_dots` then runs each distinct dot as its own
jitted `lax.dot_general` on random operands and sums count x median time. No schedule of the
program can beat that sum while its dots run one after another on the same cores, as they do on
CPU; what a step takes beyond it is the rest of the work (elementwise, reductions, copies).

  python -m experiments.bench_update    # prints the update step's dot floor beside its time
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
import statistics
import time

import jax
import numpy as np

_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?(%[\w.\-]+) = ([a-z0-9]+)\[([\d,]*)\]")
_DOT = re.compile(r"= f32\[[\d,]*\](?:\{[^}]*\})? dot\((%[\w.\-]+), (%[\w.\-]+)\)(.*)$")
_CALLEE = re.compile(r"\b(?:calls|to_apply|body|condition)=%([\w.\-]+)")
_CALLEES = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass(frozen=True)
class Dot:
  """One dot's operands and dimension numbers, as `lax.dot_general` takes them."""

  lhs: tuple[int, ...]
  rhs: tuple[int, ...]
  lhs_batch: tuple[int, ...]
  rhs_batch: tuple[int, ...]
  lhs_contract: tuple[int, ...]
  rhs_contract: tuple[int, ...]

  @property
  def flops(self) -> int:
    """2 x (every lhs element) x (the rhs's free dimensions): one multiply-add per product."""
    free = [d for i, d in enumerate(self.rhs) if i not in self.rhs_contract + self.rhs_batch]
    return 2 * math.prod(self.lhs) * math.prod(free)


def _dims(rest: str, key: str) -> tuple[int, ...]:
  m = re.search(key + r"=\{([\d,]*)\}", rest)
  return tuple(int(v) for v in m.group(1).split(",")) if m and m.group(1) else ()


def module_dots(hlo_text: str) -> collections.Counter:
  """{Dot: executions per call of the module's entry computation}."""
  bodies, entry, name = {}, None, None
  for line in hlo_text.splitlines():
    if (m := _HEADER.match(line)) and not line.startswith(" "):
      name = m.group(1)
      bodies[name] = []
      entry = name if line.startswith("ENTRY") else entry
    elif line.startswith("}"):
      name = None
    elif name is not None:
      bodies[name].append(line)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  shapes = {}
  for lines in bodies.values():
    for line in lines:
      if m := _INSTR.match(line):
        shapes[m.group(1)] = tuple(int(v) for v in m.group(3).split(",")) if m.group(3) else ()
  runs = collections.Counter()

  def visit(comp: str, times: int) -> None:
    runs[comp] += times
    for line in bodies[comp]:
      trip = int(m.group(1)) if (m := _TRIP.search(line)) and " while(" in line else 1
      callees = _CALLEE.findall(line)
      for group in _CALLEES.findall(line):
        callees += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
      for callee in callees:
        visit(callee, times * trip)

  visit(entry, 1)
  dots = collections.Counter()
  for comp, times in runs.items():
    for line in bodies[comp]:
      if m := _DOT.search(line):
        rest = m.group(3)
        dot = Dot(
            shapes[m.group(1)],
            shapes[m.group(2)],
            _dims(rest, "lhs_batch_dims"),
            _dims(rest, "rhs_batch_dims"),
            _dims(rest, "lhs_contracting_dims"),
            _dims(rest, "rhs_contracting_dims"),
        )
        dots[dot] += times
  return dots


def median_seconds(f, reps: int) -> float:
  """Median wall time of `reps` calls of `f` (its result awaited), after one untimed call."""
  jax.block_until_ready(f())
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def loop_time_dot(dot: Dot, n: int = 256, reps: int = 5) -> float:
  """Seconds per execution of `dot`, run `n` times inside one jitted loop (median of `reps`), for
  dots too small to time one call at a time (dispatch would dominate); each iteration also adds a
  scalar to the lhs and sums the output, so that no iteration is hoisted."""
  rng = np.random.default_rng(0)
  x = jax.numpy.asarray(rng.standard_normal(dot.lhs, np.float32))
  y = jax.numpy.asarray(rng.standard_normal(dot.rhs, np.float32) * 0.01)
  dims = ((dot.lhs_contract, dot.rhs_contract), (dot.lhs_batch, dot.rhs_batch))

  @jax.jit
  def loop(x, y):
    def body(_, c):
      return c + 1e-12 * jax.numpy.sum(jax.lax.dot_general(x + c, y, dims))

    return jax.lax.fori_loop(0, n, body, jax.numpy.float32(0))

  return median_seconds(lambda: loop(x, y), reps) / n


def time_dots(
    dots: collections.Counter, reps: int = 7, compiler_options: dict | None = None
) -> tuple[list[dict], float]:
  """([{dot, count, seconds, flops_per_s}] slowest total first, the floor: sum count x seconds),
  each dot timed alone as its own jitted `lax.dot_general` (compiled with the program's
  `compiler_options`), median of `reps` runs."""
  rng = np.random.default_rng(0)
  rows = []
  for dot, count in dots.items():
    x = jax.numpy.asarray(rng.standard_normal(dot.lhs, np.float32))
    y = jax.numpy.asarray(rng.standard_normal(dot.rhs, np.float32))
    dims = ((dot.lhs_contract, dot.rhs_contract), (dot.lhs_batch, dot.rhs_batch))
    f = jax.jit(
        lambda a, b, dims=dims: jax.lax.dot_general(a, b, dims), compiler_options=compiler_options
    )
    s = median_seconds(lambda f=f, x=x, y=y: f(x, y), reps)
    rows.append({"dot": dot, "count": count, "seconds": s, "flops_per_s": dot.flops / s})
  rows.sort(key=lambda r: -r["count"] * r["seconds"])
  return rows, sum(r["count"] * r["seconds"] for r in rows)


def format_rows(rows: list[dict], top: int = 8) -> str:
  """A markdown table of the `top` dots by total time."""
  out = [
      "| count | lhs | rhs | contract | batch | ms each | GFLOP/s |",
      "|---|---|---|---|---|---|---|",
  ]
  for r in rows[:top]:
    d = r["dot"]
    out.append(
        f"| {r['count']} | {list(d.lhs)} | {list(d.rhs)} | {list(d.lhs_contract)}/"
        f"{list(d.rhs_contract)} | {list(d.lhs_batch)}/{list(d.rhs_batch)} | "
        f"{r['seconds'] * 1e3:.2f} | {r['flops_per_s'] / 1e9:.1f} |"
    )
  return "\n".join(out)
