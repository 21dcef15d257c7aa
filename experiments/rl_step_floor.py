"""The dot floor of `bench_rl_step`'s RL step (issue 15): the step's dots, at the shapes it ran.

Runs our side of `bench_rl_step` (the same config, `--packing` as there) while recording every
call of the three jitted programs of a step: the update (`step.make_update`'s), the sampler's
prefill and its decode loop (`sampling._prefill`, `sampling._decode`), each as its abstract
arguments. Each recorded call is lowered and compiled again and its dots counted
(`dot_floor.module_dots`); the decode's `while_loop` has no known trip count, so its body's dots
count once per generated position: the step's longest response (`response/len_max`), the fewest
iterations that could have produced it. The update's and prefill's dots are timed alone
(`dot_floor.time_dots`); the decode's, which take microseconds, inside a jitted loop
(`dot_floor.loop_time_dot`), so that dispatch does not count. The sum over the steady steps'
calls, per step, is the floor no schedule beats while the dots run one after another on the same
cores. Compare it with a third of TRL's step time from `bench_rl_step` (the 3x target).

  python -m experiments.rl_step_floor [--packing] [--steps 8] [--warmup 2]
  python -m experiments.rl_step_floor --smoke
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import statistics
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

from entropy_rl import metrics, sampling, step as step_lib, trainer  # noqa: E402
from experiments import bench_rl_step, dot_floor, machine  # noqa: E402

PROGRAMS = ("update", "prefill", "decode")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--smoke", action="store_true", help="bench_rl_step's smoke size (a minute)")
  p.add_argument("--packing", action="store_true", help="the update on packed rows (rl.packing)")
  p.add_argument("--steps", type=int, default=None, help="RL steps (8; smoke 3)")
  p.add_argument("--warmup", type=int, default=None, help="first steps not counted (2; smoke 1)")
  p.add_argument("--out", default="", help="also write the results as JSON here")
  args = p.parse_args(argv)
  args.steps = (3 if args.smoke else 8) if args.steps is None else args.steps
  args.warmup = (1 if args.smoke else 2) if args.warmup is None else args.warmup
  if not 0 <= args.warmup < args.steps:
    p.error(f"need 0 <= --warmup < --steps, got {args.warmup} and {args.steps}")
  return args


def _abstract(tree):
  """Arrays as ShapeDtypeStructs; an uncommitted array (one jit may place) keeps no sharding."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding if x.committed else None)
      if isinstance(x, jax.Array)
      else x,
      tree,
  )


class _Recorded:
  """A jitted function that records each call's abstract arguments in `calls` before running."""

  def __init__(self, fn, calls: list):
    self.fn, self.calls = fn, calls

  def __call__(self, *args, **kwargs):
    self.calls.append((self.fn, _abstract(args), kwargs))
    return self.fn(*args, **kwargs)


@contextlib.contextmanager
def recording():
  """{program: [(jitted, abstract args, kwargs) per call]} of the trainer's update and the
  sampler's prefill and decode, while the block runs."""
  calls = {name: [] for name in PROGRAMS}
  make_update, prefill, decode = step_lib.make_update, sampling._prefill, sampling._decode
  step_lib.make_update = lambda *a, **k: _Recorded(make_update(*a, **k), calls["update"])
  sampling._prefill = _Recorded(prefill, calls["prefill"])
  sampling._decode = _Recorded(decode, calls["decode"])
  try:
    yield calls
  finally:
    step_lib.make_update, sampling._prefill, sampling._decode = make_update, prefill, decode


def call_dots(call) -> collections.Counter:
  fn, args, kwargs = call
  return dot_floor.module_dots(fn.lower(*args, **kwargs).compile().as_text())


def run(args) -> dict:
  size = bench_rl_step.SIZES["smoke" if args.smoke else "full"]
  config = bench_rl_step.bench_config(size, args.steps, args.packing)
  with tempfile.TemporaryDirectory() as workdir, recording() as calls:
    trainer.train(config, workdir)
    records = [
        r for r in metrics.read_metrics(os.path.join(workdir, metrics.METRICS_FILE)) if r["step"]
    ]
  if not all(len(calls[name]) == len(records) for name in PROGRAMS):
    raise RuntimeError(
        f"expected one call of each program per step ({len(records)} steps), recorded "
        + ", ".join(f"{name} {len(c)}" for name, c in calls.items())
    )
  steady = range(args.warmup, len(records))
  per_step = {name: collections.Counter() for name in PROGRAMS}
  for i in steady:
    iterations = int(records[i]["response/len_max"])
    for name in PROGRAMS:
      times = iterations if name == "decode" else 1
      for dot, count in call_dots(calls[name][i]).items():
        per_step[name][dot] += count * times / len(steady)
  _, update_s = dot_floor.time_dots(
      per_step["update"], compiler_options=step_lib.CPU_UPDATE_COMPILER_OPTIONS
  )
  _, prefill_s = dot_floor.time_dots(per_step["prefill"])
  decode_rows = [
      {"dot": dot, "count": count, "seconds": dot_floor.loop_time_dot(dot)}
      for dot, count in per_step["decode"].items()
  ]
  decode_s = sum(r["count"] * r["seconds"] for r in decode_rows)
  measured = {
      k: statistics.mean(records[i][k] for i in steady) for k in bench_rl_step.OURS_TIME_KEYS
  }
  return {
      "size": "smoke" if args.smoke else "full",
      "packing": bool(args.packing),
      "steady_steps": len(steady),
      "decode_iterations": statistics.mean(records[i]["response/len_max"] for i in steady),
      "dots_per_step": {name: sum(c.values()) for name, c in per_step.items()},
      "floor_s": {"update": update_s, "prefill": prefill_s, "decode": decode_s},
      "step_floor_s": update_s + prefill_s + decode_s,
      "measured_s": measured,
      "step_s": sum(measured.values()),
      "decode_dots": [
          {"lhs": r["dot"].lhs, "rhs": r["dot"].rhs, "count": r["count"], "us": 1e6 * r["seconds"]}
          for r in sorted(decode_rows, key=lambda r: -r["count"] * r["seconds"])
      ],
  }


def format_table(r: dict) -> str:
  f, m = r["floor_s"], r["measured_s"]
  lines = [
      f"bench_rl_step's step ({r['size']}{', rl.packing' if r['packing'] else ''}), "
      f"{r['steady_steps']} steady steps, {r['decode_iterations']:.0f} decode iterations per step",
      "",
      "| program | dots per step | dot floor s | measured s |",
      "|---|---|---|---|",
      f"| update | {r['dots_per_step']['update']:.0f} | {f['update']:.3f} | "
      f"{m['time/update']:.3f} |",
      f"| prefill + decode | {r['dots_per_step']['prefill'] + r['dots_per_step']['decode']:.0f} | "
      f"{f['prefill'] + f['decode']:.3f} | {m['time/rollout']:.3f} |",
      f"| step | | {r['step_floor_s']:.3f} | {r['step_s']:.3f} |",
      "",
      "decode dots (in a jitted loop): "
      + "; ".join(
          f"{d['lhs']} x {d['rhs']}: {d['count']:.0f} x {d['us']:.1f} us" for d in r["decode_dots"]
      ),
      machine.describe(r["machine"]),
  ]
  return "\n".join(lines)


def main(argv=None) -> dict:
  return machine.measure(run, format_table, parse_args(argv))


if __name__ == "__main__":
  main()
