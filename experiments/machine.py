"""The machine a benchmark ran on: CPU model, cores, and the load average before and after.

Every benchmark calls `begin()` before measuring and `end(info)` after, stores the returned dict
(JSON-able) with its results and prints `describe(info)` last. The machine was idle when the
1-minute load average before was at most `IDLE_LOAD`, and the one after at most the benchmark's own
threads (one per usable core) plus `IDLE_LOAD`: a benchmark that keeps every core busy for a minute
raises the load to about the core count by itself, so only more than that means another job ran
during it. Otherwise the numbers are not comparable with an idle machine's, and `describe` says so
in a WARNING line. `cpu_kind()` (model and vector extension) is stamped in every study run's spec.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform

IDLE_LOAD = 0.5  # 1-minute load average above which the machine was not idle
CPUINFO = "/proc/cpuinfo"


def _cpuinfo() -> dict:
  """/proc/cpuinfo's fields (the first processor's where they repeat); {} where it cannot be read."""
  try:
    with open(CPUINFO) as f:
      fields = dict(line.split(":", 1) for line in reversed(f.readlines()) if ":" in line)
  except OSError:
    fields = {}
  return {k.strip(): v.strip() for k, v in fields.items()}


def cpu_model() -> str:
  """The CPU's model name (x86 'model name', Arm 'Hardware' / 'Model'), else `platform`'s."""
  fields = _cpuinfo()
  for key in ("model name", "Hardware", "Model"):
    if fields.get(key):
      return fields[key]
  return platform.processor() or platform.machine() or "unknown"


# Widest first. XLA:CPU compiles for the host's vector units, so runs on one CPU model with other
# units (an EPYC with AVX-512 and one without) differ in their last bits and then in their curves.
VECTOR_ISAS = ("avx512f", "avx2", "avx", "sse4_2", "sve2", "sve", "asimd")


def vector_isa() -> str:
  """The widest SIMD extension the CPU reports (x86 'flags', Arm 'Features'), else 'unknown'."""
  fields = _cpuinfo()
  flags = set((fields.get("flags") or fields.get("Features") or "").split())
  return next((isa for isa in VECTOR_ISAS if isa in flags), "unknown")


def cpu_kind() -> str:
  """The CPU a run's bits depend on: its model and widest vector extension."""
  return f"{cpu_model()} ({vector_isa()})"


def idle_limits(info: dict) -> dict:
  """The highest idle 1-minute load average before and after a measurement."""
  return {"before": IDLE_LOAD, "after": info["usable_cores"] + IDLE_LOAD}


def _warning(info: dict) -> str | None:
  loads = {"before": info["load_before"][0]}
  if "load_after" in info:
    loads["after"] = info["load_after"][0]
  limits = idle_limits(info)
  high = {k: v for k, v in loads.items() if v > limits[k]}
  if not high:
    return None
  when = " and ".join(f"{v:.2f} {k} (above {limits[k]:g})" for k, v in high.items())
  return (
      f"WARNING: the machine was not idle (1-minute load average {when} the measurement): "
      "these numbers are not comparable with an idle machine's; rerun on an idle machine"
  )


def begin() -> dict:
  """The machine and its load before the measurement; prints them (and the warning if loaded)."""
  info = {
      "cpu_model": cpu_model(),
      "cpu_count": os.cpu_count(),
      "usable_cores": len(os.sched_getaffinity(0)),
      "idle_load_threshold": IDLE_LOAD,
      "load_before": list(os.getloadavg()),
  }
  info["warning"] = _warning(info)
  print(describe(info), flush=True)
  return info


def end(info: dict) -> dict:
  """`info` with the load after the measurement, `idle` and `warning` (None when idle)."""
  info = dict(info, load_after=list(os.getloadavg()))
  info["warning"] = _warning(info)
  info["idle"] = info["warning"] is None
  return info


def describe(info: dict) -> str:
  """One line on the machine and its load (1, 5, 15 minutes), then the WARNING if not idle."""
  fmt = lambda loads: ", ".join(f"{x:.2f}" for x in loads)
  line = (
      f"machine: {info['cpu_model']}, {info['cpu_count']} cores ({info['usable_cores']} "
      f"usable); load average (1, 5, 15 min) before {fmt(info['load_before'])}"
  )
  if "load_after" in info:
    line += f", after {fmt(info['load_after'])}"
  return line + (f"\n{info['warning']}" if info["warning"] else "")


def measure(run, format_table, args) -> dict:
  """`run(args)` between `begin()` and `end()` (stored as its result's 'machine'), its table
  printed, and the result written as JSON to `args.out` when given."""
  info = begin()
  r = run(args)
  r["machine"] = end(info)
  print(format_table(r))
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(r, indent=2))
  return r
