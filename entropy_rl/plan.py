"""Pre-flight for pods: compile one RL step for a Cloud TPU slice on any machine and say what fits.

  python -m entropy_rl.plan --config=configs/<family>.py:<preset> --topology=v5p-64 [--config.a.b=v]

libtpu (`pip install -r requirements-tpu.txt`) describes the slice: its chips and which host owns
each. The mesh is built from them exactly as the trainer builds it, every host's rows of the
rollout and update batches are checked, and the programs of one RL step are compiled by XLA:TPU
ahead of time from abstract inputs (no weights are read, no TPU is needed). One table shows, per
chip, the arguments, temporaries and peak memory against the chip's HBM, the FLOPs and HBM bytes
of the compiled program (every loop iteration counted) and its roofline time. The exit status is
non-zero, with the config fields to change, when a program leaves less than `--headroom` of HBM.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from entropy_rl import config_lib, distributed, models, sharding, step as step_lib

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  hbm_bytes: int
  flops_per_s: float  # bf16 peak
  hbm_bytes_per_s: float


# Public Cloud TPU specifications, per chip.
CHIPS = {
    "v4": Chip(32 * GiB, 275e12, 1228e9),
    "v5e": Chip(16 * GiB, 197e12, 819e9),
    "v5p": Chip(95 * GiB, 459e12, 2765e9),
    "v6e": Chip(32 * GiB, 918e12, 1640e9),
}
# Chips -> slice shape. v4 and v5p count TensorCores in their gcloud names (2 per chip).
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}
SINGLE_HOST_CHIPS = 8  # v5e / v6e slices up to 8 chips are one host; larger ones 4 chips a host


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # as given
  generation: str  # v4 | v5e | v5p | v6e
  shape: str  # chips per axis, e.g. '2x4x4'

  @property
  def chip(self) -> Chip:
    return CHIPS[self.generation]

  @property
  def num_chips(self) -> int:
    return math.prod(int(s) for s in self.shape.split("x"))


def parse_topology(name: str) -> Topology:
  """A gcloud accelerator type (v4-32, v5litepod-64 / v5e-64, v5p-64, v6e-16) or a topology
  string (v5p:2x4x4, v5e:8x8, v4:2x2x4)."""
  m = re.fullmatch(r"(v\d[a-z]*)([-:])(\S+)", name.strip().lower())
  gen = m and _ALIASES.get(m.group(1), m.group(1))
  if not m or gen not in CHIPS:
    raise ValueError(f"--topology={name!r}: expected e.g. v4-32, v5e-64, v5litepod-64, v5p-64, "
                     f"v6e-16 or v5p:2x4x4 (generations {sorted(CHIPS)})")
  if m.group(2) == ":":
    if not re.fullmatch(r"\d+(x\d+){1,2}", m.group(3)):
      raise ValueError(f"--topology={name!r}: the shape after ':' must look like 2x4x4")
    return Topology(name, gen, m.group(3))
  count = int(m.group(3)) if m.group(3).isdigit() else -1
  table, chips = ((_SHAPES_3D, count // 2) if gen in ("v4", "v5p") else (_SHAPES_2D, count))
  if chips not in table:
    raise ValueError(f"--topology={name!r}: no {gen} slice of that size; known: "
                     + ", ".join(f"{m.group(1)}-{c * 2 if table is _SHAPES_3D else c}"
                                 for c in table))
  return Topology(name, gen, table[chips])


def topology_devices(topology: Topology) -> list:
  """The slice's devices (with process_index and coords) from libtpu; needs no TPU."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # beside any other libtpu user
  from jax.experimental import topologies
  kwargs = {}
  if topology.generation == "v4":
    kwargs["chip_config_name"] = "megacore"
  dims = [int(s) for s in topology.shape.split("x")]
  if len(dims) == 2 and topology.num_chips <= SINGLE_HOST_CHIPS:
    kwargs["chips_per_host_bounds"] = (*dims, 1)
  try:
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=f"{topology.generation}:{topology.shape}", **kwargs)
  except RuntimeError as e:
    raise RuntimeError(f"{e}; install libtpu with `pip install -r requirements-tpu.txt`") from e
  return list(desc.devices)
