"""Pre-flight for pods: compile one RL step for a Cloud TPU slice on any machine and say what fits.

  python -m entropy_rl.plan --config=configs/<family>.py:<preset> --topology=v5p-64 [--config.a.b=v]

libtpu (`pip install -r requirements-tpu.txt`) describes the slice: its chips and which host owns
each. The mesh is built from them exactly as the trainer builds it, every host's rows of the
rollout and update batches are checked, and the programs of one RL step are compiled by XLA:TPU
ahead of time from abstract inputs (no weights are read, no TPU is needed). One table shows, per
chip, the arguments, temporaries and peak memory against the chip's HBM, the FLOPs and HBM bytes
of the compiled program (every loop iteration counted) and its roofline time. The exit status is
non-zero, with the config fields to change, when a program leaves less than `--headroom` of HBM.
The sampler's programs (`rollout_programs`: serving weights, prefill, decode loop, for a training
rollout and an evaluation chunk) are compiled too (`--sampler_only`: only they), their peaks with
the training state the trainer holds while it samples; the decode roofline is memory-bound.
"""

from __future__ import annotations

import dataclasses
import functools
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


class CompileError(RuntimeError):
  """XLA:TPU refused a program for a reason other than HBM; the message names the config fields
  that shape the program (`plan` adds them) and the compiler's own first line."""


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
_SHAPES_3D = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
    1024: "8x8x16",
    2048: "8x16x16",
    4096: "16x16x16",
}
_SHAPES_2D = {
    1: "1x1",
    4: "2x2",
    8: "2x4",
    16: "4x4",
    32: "4x8",
    64: "8x8",
    128: "8x16",
    256: "16x16",
}
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
    raise ValueError(
        f"--topology={name!r}: expected e.g. v4-32, v5e-64, v5litepod-64, v5p-64, "
        f"v6e-16 or v5p:2x4x4 (generations {sorted(CHIPS)})"
    )
  if m.group(2) == ":":
    if not re.fullmatch(r"\d+(x\d+){1,2}", m.group(3)):
      raise ValueError(f"--topology={name!r}: the shape after ':' must look like 2x4x4")
    return Topology(name, gen, m.group(3))
  count = int(m.group(3)) if m.group(3).isdigit() else -1
  table, chips = (_SHAPES_3D, count // 2) if gen in ("v4", "v5p") else (_SHAPES_2D, count)
  if chips not in table:
    raise ValueError(
        f"--topology={name!r}: no {gen} slice of that size; known: "
        + ", ".join(f"{m.group(1)}-{c * 2 if table is _SHAPES_3D else c}" for c in table)
    )
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
        platform="tpu", topology_name=f"{topology.generation}:{topology.shape}", **kwargs
    )
  except RuntimeError as e:
    raise RuntimeError(f"{e}; install libtpu with `pip install -r requirements-tpu.txt`") from e
  return list(desc.devices)


# config.json fields of the papers' models (Hugging Face), so a plan needs no checkpoint.
PAPER_ARCHITECTURES = {
    "qwen2_5_7b": dict(
        model_type="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        rope_theta=1e6,
    ),
    "qwen2_5_32b": dict(
        model_type="qwen2",
        vocab_size=152064,
        hidden_size=5120,
        intermediate_size=27648,
        num_layers=64,
        num_heads=40,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=1e6,
    ),
    "qwen3_8b": dict(
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=1e6,
    ),
    "qwen3_14b": dict(
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=5120,
        intermediate_size=17408,
        num_layers=40,
        num_heads=40,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=1e6,
    ),
    "qwen3_32b": dict(
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=5120,
        intermediate_size=25600,
        num_layers=64,
        num_heads=64,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=1e6,
    ),
}


def model_config(c) -> models.ModelConfig:
  """The policy's ModelConfig without weights: `model.hf_path`/config.json if it exists, else
  the paper model the path is named after; the tiny policy from the character tokenizer."""
  dtypes = dict(
      dtype=c.model.dtype,
      param_dtype=c.model.param_dtype,
      remat=c.model.remat,
      attention_impl=c.model.attention_impl,
  )
  if c.model.source == "hf":
    if os.path.isfile(os.path.join(c.model.hf_path, "config.json")):
      from entropy_rl.models import hf

      return hf.load_config(c.model.hf_path, **dtypes)
    name = os.path.basename(os.path.normpath(c.model.hf_path))
    if name not in PAPER_ARCHITECTURES:
      raise ValueError(
          f"config.model.hf_path={c.model.hf_path!r}: no config.json there and not "
          f"named after a paper model {sorted(PAPER_ARCHITECTURES)}"
      )
    return models.ModelConfig(**PAPER_ARCHITECTURES[name], **dtypes)
  from entropy_rl import data as data_lib, policy

  with tempfile.TemporaryDirectory() as tmp:
    vocab_size = len(data_lib.build_tokenizer(os.path.join(tmp, "tokenizer")))
  return policy.tiny_model_config(c.model, vocab_size)


# ----------------------------------------------------------------------------- compiled costs

_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "bf16": 2,
    "f16": 2,
    "s16": 2,
    "u16": 2,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "f64": 8,
    "s64": 8,
    "u64": 8,
}
_ARRAY = re.compile(r"([a-z]\w*)\[([\d,]*)\]")
_NO_TRAFFIC = {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "while",
    "call",
    "conditional",
    "after-all",
    "partition-id",
    "replica-id",
    "opt-barrier",
}
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def _dims(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def _nbytes(shape: str) -> float:
  return sum(_DTYPE_BYTES.get(t, 0) * math.prod(_dims(d)) for t, d in _ARRAY.findall(shape))


def _split_instruction(line: str):
  """(name, shape, opcode, operand names, attributes) of one HLO instruction line, or None."""
  m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", line)
  if not m:
    return None
  rest, depth = line[m.end() :], 0
  # The shape: an array type, or a (possibly nested) tuple; i is read after the loop.
  for i, ch in enumerate(rest):  # noqa: B007
    depth += ch == "("
    depth -= ch == ")"
    if ch == " " and depth == 0:
      break
  shape, rest = rest[:i], rest[i + 1 :]
  op = re.match(r"([\w\-]+)\(", rest)
  if not op:
    return None
  depth, j = 1, op.end()
  while depth and j < len(rest):
    depth += (rest[j] == "(") - (rest[j] == ")")
    j += 1
  args = rest[op.end() : j - 1]
  operands = re.findall(r"%([\w.\-]+)", args)
  if op.group(1) in ("constant", "parameter"):
    operands = [args]  # the literal, the parameter number
  return m.group(1), shape, op.group(1), operands, rest[j:]


def _valid_taps(
    size_in: int,
    size_out: int,
    window: int,
    pad_lo: int,
    stride: int,
    lhs_dilate: int,
    rhs_dilate: int,
) -> int:
  """Window taps, summed over the output positions of one spatial dimension, that read the input
  rather than its padding (XLA:TPU writes some matmuls as padded convolutions)."""
  extent = (size_in - 1) * lhs_dilate  # the last input position of the dilated input
  total = 0
  for k in range(window):
    offset = k * rhs_dilate - pad_lo  # the input position that output 0 reads with tap k
    if lhs_dilate == 1:
      first, last = max(0, -(offset // stride)), min(size_out - 1, (extent - offset) // stride)
      total += max(0, last - first + 1)
    else:
      pos = offset + stride * np.arange(size_out)
      total += int(np.sum((pos >= 0) & (pos <= extent) & (pos % lhs_dilate == 0)))
  return total


def _conv_flops(shape, operands, attrs, shapes) -> float:
  """2 x output elements x (input features x window taps that read the input, per output)."""
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attrs)
  if not labels:
    return 0.0
  lhs_labels, rhs_labels, out_labels = labels.groups()
  lhs = _dims(_ARRAY.findall(shapes[operands[0]])[0][1])
  kernel = _dims(_ARRAY.findall(shapes[operands[1]])[0][1])
  out = _dims(_ARRAY.findall(shape)[0][1])
  window = re.search(r"window=\{([^}]*)\}", attrs)
  fields = dict(f.split("=", 1) for f in window.group(1).split()) if window else {}

  def field(name, d, default):
    return [int(v) for v in re.split(r"[x_]", fields[name])][d] if name in fields else default

  macs = kernel[rhs_labels.index("i")]
  for d in range(sum(ch.isdigit() for ch in out_labels)):
    size_out = out[out_labels.index(str(d))]
    pad_lo = int(fields["pad"].split("x")[d].split("_")[0]) if "pad" in fields else 0
    taps = _valid_taps(
        lhs[lhs_labels.index(str(d))],
        size_out,
        kernel[rhs_labels.index(str(d))],
        pad_lo,
        field("stride", d, 1),
        field("lhs_dilate", d, 1),
        field("rhs_dilate", d, 1),
    )
    macs *= taps / size_out
  return 2.0 * math.prod(out) * macs


def _op_flops(opcode, shape, operands, attrs, shapes) -> float:
  if opcode == "convolution":
    return _conv_flops(shape, operands, attrs, shapes)
  out = sum(math.prod(_dims(d)) for _, d in _ARRAY.findall(shape)[:1])
  lhs = _dims(_ARRAY.findall(shapes[operands[0]])[0][1])
  contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs)
  return 2.0 * out * math.prod(lhs[k] for k in _dims(contracting.group(1)) if contracting)


_PASS_THROUGH = ("copy", "convert", "bitcast")
_FLIPPED = {"LT": "GT", "LE": "GE", "GT": "LT", "GE": "LE", "EQ": "EQ", "NE": "NE"}


def _int_constant(inst) -> int | None:
  if inst and inst[2] == "constant" and re.fullmatch(r"-?\d+", inst[3][0].strip()):
    return int(inst[3][0])
  return None


def _iterations(start: int, step: int, bound: int, direction: str) -> int | None:
  if direction in ("LT", "LE") and step > 0:
    return max(0, -((start - bound - (direction == "LE")) // step))
  if direction in ("GT", "GE") and step < 0:
    return max(0, -((bound - start - (direction == "GE")) // -step))
  if direction == "NE" and step and (bound - start) % step == 0 and (bound - start) // step >= 0:
    return (bound - start) // step
  return None


@dataclasses.dataclass
class _Module:
  """An HLO module's instructions, by computation and name, and each computation's root."""

  insts: dict[str, dict[str, tuple]]
  roots: dict[str, str]

  def source(self, comp: str, name: str):
    """The instruction `name` of `comp` is, seen through copies and converts, and through a
    fusion of one operation (which it becomes, on the fusion's operands); None if unknown."""
    inst = self.insts[comp].get(name)
    while inst and inst[2] in _PASS_THROUGH:
      inst = self.insts[comp].get(inst[3][0])
    if inst and inst[2] == "fusion":
      callee = re.search(r"calls=%([\w.\-]+)", inst[4]).group(1)
      root = self.insts[callee].get(self.roots.get(callee))
      params = [self.insts[callee].get(o) for o in root[3]] if root else [None]
      if all(p and p[2] == "parameter" for p in params):
        return (inst[0], root[1], root[2], [inst[3][int(p[3][0])] for p in params], root[4])
    return inst

  def state_index(self, comp: str, inst) -> int | None:
    """k when `inst` is element k of the loop state (the parameter of `comp`)."""
    if (
        inst
        and inst[2] == "get-tuple-element"
        and (self.insts[comp].get(inst[3][0], (0, 0, ""))[2] == "parameter")
    ):
      return int(re.search(r"index=(\d+)", inst[4]).group(1))
    return None

  def trip_count(self, caller: str, init: str, cond: str, body: str) -> int | None:
    """Iterations of a while loop from its counter: a compare in its condition (each compare of
    a conjunction: the loop ends at the first false, so the bound of a data-dependent loop), the
    counter's value in the loop's initial tuple (`init`, in `caller`) and its constant step in
    the body."""
    start_tuple = self.source(caller, init)
    body_tuple = self.insts[body].get(self.roots.get(body))
    if not start_tuple or start_tuple[2] != "tuple" or not body_tuple or body_tuple[2] != "tuple":
      return None
    counts, pending = [], [self.roots.get(cond)]
    while pending:
      inst = self.source(cond, pending.pop())
      if inst and inst[2] == "and":
        pending += inst[3]
      if not inst or inst[2] != "compare":
        continue
      direction = re.search(r"direction=(\w+)", inst[4]).group(1)
      counter, bound = (self.source(cond, o) for o in inst[3])
      if _int_constant(counter) is not None:
        counter, bound, direction = bound, counter, _FLIPPED[direction]
      k, bound = self.state_index(cond, counter), _int_constant(bound)
      if k is None or bound is None:
        continue
      start = _int_constant(self.source(caller, start_tuple[3][k]))
      update = self.source(body, body_tuple[3][k])
      if start is None or not update or update[2] not in ("add", "subtract"):
        continue
      x, c = (self.source(body, o) for o in update[3])
      if update[2] == "add" and _int_constant(x) is not None:
        x, c = c, x
      step = _int_constant(c)
      if step is None or self.state_index(body, x) != k:
        continue
      n = _iterations(start, step if update[2] == "add" else -step, bound, direction)
      if n is not None:
        counts.append(n)
    return min(counts) if counts else None

  def _reads(self, comp: str, name: str) -> float | None:
    """Bytes of value `name` that `comp` reads when it only slices it (dynamic-slice, gather) or
    updates it in place (dynamic-update-slice: counted as the write); None when read whole."""
    total = 0.0
    for inst in self.insts[comp].values():
      for pos, o in enumerate(inst[3]):
        if o != name:
          continue
        if inst[2] == "bitcast":
          r = self._reads(comp, inst[0])
        elif inst[2] in ("dynamic-slice", "gather") and pos == 0:
          r = _nbytes(inst[1])
        elif inst[2] == "dynamic-update-slice" and pos == 0:
          r = 0.0
        else:
          return None
        if r is None:
          return None
        total += r
    return total

  def _writes(self, comp: str, name: str) -> float:
    """Bytes written by the value `name` of `comp`: an in-place update writes only its update."""
    inst = self.insts[comp][name]
    if inst[2] == "bitcast":
      return self._writes(comp, inst[3][0])
    if inst[2] == "tuple":
      return sum(self._writes(comp, o) for o in inst[3])
    if inst[2] == "dynamic-update-slice":
      return _nbytes(self.insts[comp][inst[3][1]][1])
    return _nbytes(inst[1])

  def traffic(self, comp: str, inst) -> float:
    """HBM bytes one execution of instruction `inst` of `comp` moves: operands read and results
    written, where slicing, in-place updates (also inside fusions) and async pairs (counted at
    the start) move only what they touch."""
    _, shape, opcode, operands, attrs = inst
    if opcode in _NO_TRAFFIC or opcode.endswith("-done"):
      return 0.0
    operand_bytes = [
        _nbytes(self.insts[comp][o][1]) if o in self.insts[comp] else 0.0 for o in operands
    ]
    if opcode.endswith("-start"):  # its tuple holds the operand and the result
      return sum(operand_bytes) + _largest_array(shape)
    if opcode in ("dynamic-slice", "gather"):
      return 2 * _nbytes(shape) + sum(operand_bytes[1:])
    if opcode == "dynamic-update-slice":
      return 2 * operand_bytes[1] + sum(operand_bytes[2:])
    if opcode != "fusion":
      return _nbytes(shape) + sum(operand_bytes)
    callee = re.search(r"calls=%([\w.\-]+)", attrs).group(1)
    params = {int(i[3][0]): i[0] for i in self.insts[callee].values() if i[2] == "parameter"}
    reads = 0.0
    for k, whole in enumerate(operand_bytes):
      r = self._reads(callee, params[k]) if k in params else None
      reads += whole if r is None else r
    return reads + self._writes(callee, self.roots[callee])


def _largest_array(shape: str) -> float:
  return max((_nbytes(f"{t}[{d}]") for t, d in _ARRAY.findall(shape)), default=0.0)


@dataclasses.dataclass
class Costs:
  flops: float = 0.0  # matmul FLOPs (dot and convolution), every loop iteration counted
  hbm_bytes: float = 0.0  # read and written by every unfused instruction and fusion
  ici_bytes: float = 0.0  # results of the collectives
  unknown_trip_counts: int = 0  # while loops whose counter was not found (counted once)


def hlo_costs(hlo_text: str) -> Costs:
  """Per-chip costs of a compiled (SPMD-partitioned) HLO module. XLA's cost_analysis() counts a
  loop body once; here each body counts its trip count (`_Module.trip_count`),
  times that of every loop around it."""
  comps: dict[str, list] = {}
  roots: dict[str, str] = {}
  order, entry = [], None
  for line in hlo_text.splitlines():
    head = re.match(r"(ENTRY )?%([\w.\-]+) .*\{$", line)
    if head and not line.startswith(" "):
      name = head.group(2)
      comps[name], current = [], head.group(2)
      order.append(name)
      entry = name if head.group(1) else entry
    elif line.startswith(" ") and order:
      inst = _split_instruction(line)
      if inst:
        comps[current].append(inst)
        if line.lstrip().startswith("ROOT "):
          roots[current] = inst[0]
  shapes = {c: {i[0]: i[1] for i in insts} for c, insts in comps.items()}
  module = _Module({c: {i[0]: i for i in insts} for c, insts in comps.items()}, roots)

  costs = Costs()
  control = {entry: 1.0}
  fused: dict[str, float] = {}
  for name in reversed(order):  # HLO text lists callees before their callers
    if name in control:
      times = control[name]
      for inst_name, shape, opcode, operands, attrs in comps[name]:
        if opcode == "while":
          body = re.search(r"body=%([\w.\-]+)", attrs).group(1)
          cond = re.search(r"condition=%([\w.\-]+)", attrs).group(1)
          n = module.trip_count(name, operands[0], cond, body)
          if n is None:
            costs.unknown_trip_counts += 1
            n = 1
          control[body] = control.get(body, 0.0) + times * n
          control[cond] = control.get(cond, 0.0) + times * (n + 1)
        elif opcode in ("call", "conditional"):
          called = re.findall(r"(?:to_apply|_computation|computations)=\{?([%\w.\-, ]+)\}?", attrs)
          for c in re.findall(r"%([\w.\-]+)", " ".join(called)):
            control[c] = control.get(c, 0.0) + times
        elif opcode == "fusion":
          callee = re.search(r"calls=%([\w.\-]+)", attrs).group(1)
          fused[callee] = fused.get(callee, 0.0) + times
        if opcode in ("dot", "convolution"):
          costs.flops += times * _op_flops(opcode, shape, operands, attrs, shapes[name])
        costs.hbm_bytes += times * module.traffic(name, (inst_name, shape, opcode, operands, attrs))
        if opcode.removesuffix("-start") in _COLLECTIVES:
          costs.ici_bytes += times * _largest_array(shape)
    elif name in fused:
      times = fused[name]
      for _, shape, opcode, operands, attrs in comps[name]:
        if opcode == "fusion":
          callee = re.search(r"calls=%([\w.\-]+)", attrs).group(1)
          fused[callee] = fused.get(callee, 0.0) + times
        elif opcode in ("dot", "convolution"):
          costs.flops += times * _op_flops(opcode, shape, operands, attrs, shapes[name])
  return costs


# ----------------------------------------------------------------------------- programs


@dataclasses.dataclass
class Program:
  """One compiled program: per-chip memory (memory_analysis) and costs (`hlo_costs`)."""

  name: str
  calls: int  # per RL step
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  costs: Costs
  hlo_text: str = dataclasses.field(repr=False)  # the compiled, partitioned module
  compiled: bool = True  # False: XLA:TPU refused it (temporaries over the chip's HBM)

  @property
  def peak_bytes(self) -> int:
    return (
        self.argument_bytes
        + self.output_bytes
        - self.alias_bytes
        + self.temp_bytes
        + self.code_bytes
    )

  def seconds(self, chip: Chip) -> float:
    """Roofline time of one call: compute- or HBM-bound, whichever is slower."""
    return max(self.costs.flops / chip.flops_per_s, self.costs.hbm_bytes / chip.hbm_bytes_per_s)


def _shard_bytes(tree) -> int:
  """Per-device bytes of a tree of sharded ShapeDtypeStructs."""

  def one(x):
    key = jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    return math.prod(x.sharding.shard_shape(x.shape)) * (8 if key else np.dtype(x.dtype).itemsize)

  return sum(one(x) for x in jax.tree.leaves(tree))


def compile_program(name: str, lowered, args=(), calls: int = 1) -> Program:
  """`lowered` compiled by XLA:TPU. When the compiler refuses it for want of HBM, the program
  comes back uncompiled: the temporaries it asked for (from the compiler's message), the
  arguments (`args`, the abstract inputs) and no costs."""
  return _compile(name, lowered, args, calls)[0]


def _compile(name: str, lowered, args, calls: int):
  """(`compile_program`'s Program, the compiled output shardings or None when refused)."""
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    need = re.search(r"RESOURCE_EXHAUSTED:.*?temporaries \(([\d.]+)([KMGT])\)", str(e))
    if not need:
      first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
      raise CompileError(f"XLA:TPU cannot compile the {name} program: {first.strip()}") from e
    temp = float(need.group(1)) * 2 ** (10 * (1 + "KMGT".index(need.group(2))))
    refused = Program(name, calls, _shard_bytes(args), 0, 0, int(temp), 0, Costs(), "", False)
    return refused, None
  mem, text = compiled.memory_analysis(), compiled.as_text()
  program = Program(
      name,
      calls,
      mem.argument_size_in_bytes,
      mem.output_size_in_bytes,
      mem.alias_size_in_bytes,
      mem.temp_size_in_bytes,
      mem.generated_code_size_in_bytes,
      hlo_costs(text),
      text,
  )
  return program, compiled.output_shardings


def _abstract(tree, shardings):
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
  )


def update_batch(c, mesh) -> step_lib.Batch:
  """Abstract update inputs of one rollout: rows over ('data', 'fsdp'), as the trainer feeds."""
  n, p, length = (
      c.rollout.prompts_per_step * c.rollout.num_samples,
      c.task.max_prompt_len,
      c.rollout.max_new_tokens,
  )
  rows = sharding.batch_sharding(mesh)
  spec = {
      "tokens": ((n, p + length), jnp.int32),
      "attn_mask": ((n, p + length), jnp.int32),
      "response_mask": ((n, length), jnp.float32),
      "old_logp": ((n, length), jnp.float32),
      "advantages": ((n, length), jnp.float32),
  }
  if c.loss.kl_ref_coef > 0:
    spec["ref_logp"] = ((n, length), jnp.float32)
  return step_lib.Batch(
      **{k: jax.ShapeDtypeStruct(shape, dtype, sharding=rows) for k, (shape, dtype) in spec.items()}
  )


def training_programs(c, mesh, model_cfg) -> list[Program]:
  """The update (and the reference log-probs when a KL term is on), compiled for `mesh`."""
  import functools

  rules = sharding.default_rules()
  model = models.Decoder(model_cfg)
  run = config_lib.typed(c, mesh.devices.size)
  upd_cfg = run.update
  updates = c.num_steps * upd_cfg.num_minibatches * upd_cfg.ppo_epochs
  optimizer = step_lib.make_optimizer(run.optim, updates)
  schedule = step_lib.lr_schedule(run.optim, updates)
  params = jax.eval_shape(functools.partial(models.init_params, model_cfg), jax.random.key(0))
  param_shardings = sharding.logical_to_mesh_sharding(
      models.param_logical_axes(model_cfg), mesh, rules, params
  )
  abstract = jax.eval_shape(
      lambda p: step_lib.TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p)), params
  )
  shardings = step_lib.state_shardings(abstract, optimizer, mesh, param_shardings)
  replicated = sharding.replicated_sharding(mesh)
  key = jax.ShapeDtypeStruct(
      (), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=replicated
  )
  batch = update_batch(c, mesh)
  update = step_lib.make_update(
      model, model_cfg, upd_cfg, optimizer, schedule, mesh, shardings, rules
  )
  args = (_abstract(abstract, shardings), batch, key)
  out = [compile_program("update", update.lower(*args), args)]
  if upd_cfg.loss.kl_ref_coef > 0:
    ref = step_lib.make_reference_logprobs(model, model_cfg, upd_cfg, mesh, rules)
    args = (_abstract(params, param_shardings), batch)
    out.append(compile_program("reference", ref.lower(*args), args))
  return out


# ----------------------------------------------------------------------------- rollout programs


@dataclasses.dataclass
class RolloutProgram(Program):
  """A sampler program; its peak adds what the trainer holds in HBM while it samples."""

  held_bytes: int = 0  # the training state (and reference weights), live but not an argument
  # decode: the compiled step's HBM traffic as `hlo_costs` counts it (in-place scatters whole);
  # its costs.hbm_bytes are `decode_step_bytes`
  counted_hbm_bytes: float = 0.0

  @property
  def peak_bytes(self) -> int:
    return Program.peak_bytes.fget(self) + self.held_bytes


def _compile_rollout(name: str, lowered, args, calls: int, held_bytes: int):
  """(RolloutProgram, its compiled output shardings); a program XLA:TPU refuses for want of HBM
  comes back uncompiled (as `compile_program`'s) with output shardings None."""
  program, out_shardings = _compile(name, lowered, args, calls)
  fields = {f.name: getattr(program, f.name) for f in dataclasses.fields(Program)}
  return RolloutProgram(**fields, held_bytes=held_bytes), out_shardings


def decode_steps(num_rows: int, max_new_tokens: int, rows_in_flight: int) -> int:
  """Decode-loop iterations when every response runs to `max_new_tokens` (token 0 comes from the
  prefill): the N x (L - 1) tokens over R slots, kept full by the queue."""
  return -(-num_rows * (max_new_tokens - 1) // rows_in_flight)


def decode_step_bytes(serving, state) -> int:
  """HBM bytes one decode step reads per chip (abstract sharded inputs): the chip's shard of every
  serving weight (decoding is weight-stationary, `sharding.decode_rules`: the activations move,
  the weights stay where they lie) and the KV-cache slots of its rows. The decode roofline is
  memory-bound: these bytes at the chip's bandwidth."""
  return _shard_bytes(serving) + _shard_bytes((state["slots"]["k"], state["slots"]["v"]))


def rollout_programs(c, run, mesh, model_cfg) -> list[RolloutProgram]:
  """The sampler's programs of one training rollout and of one evaluation chunk (its sampled
  pass, the larger: eval.num_samples responses a prompt), compiled for `mesh` from abstract
  inputs sharded as the trainer shards them: the cast to serving weights ('weights'), the prompt
  prefill ('prefill') and the decode loop ('decode'; its costs are one step's, its calls the
  steps of `decode_steps`). `c` has its micro-batches and rows in flight resolved; `run` is its
  `config_lib.typed` form."""
  import flax.linen as nn

  from entropy_rl import rollout as rollout_lib, sampling

  rules = sharding.default_rules()
  upd_cfg = run.update
  updates = c.num_steps * upd_cfg.num_minibatches * upd_cfg.ppo_epochs
  optimizer = step_lib.make_optimizer(run.optim, updates)
  params = jax.eval_shape(functools.partial(models.init_params, model_cfg), jax.random.key(0))
  param_shardings = sharding.logical_to_mesh_sharding(
      models.param_logical_axes(model_cfg), mesh, rules, params
  )
  state = jax.eval_shape(
      lambda p: step_lib.TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p)), params
  )
  state = _abstract(state, step_lib.state_shardings(state, optimizer, mesh, param_shardings))
  master = state.params
  held = _shard_bytes(state) + (_shard_bytes(master) if upd_cfg.loss.kl_ref_coef > 0 else 0)
  replicated = sharding.replicated_sharding(mesh)
  rows = sharding.batch_sharding(mesh)
  b, p = c.rollout.prompts_per_step, c.task.max_prompt_len
  prompt = jax.ShapeDtypeStruct((b, p), jnp.int32, sharding=rows)
  key = jax.ShapeDtypeStruct(
      (), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=replicated
  )
  model = models.Decoder(model_cfg)
  eval_new = c.eval.max_new_tokens if c.eval.max_new_tokens > 0 else c.rollout.max_new_tokens
  passes = [
      ("", c.rollout.num_samples, c.rollout.max_new_tokens, c.rollout.temperature),
      ("eval-", c.eval.num_samples, eval_new, c.eval.temperature),
  ]
  out = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    serving = None
    for prefix, g, new_tokens, temperature in passes:
      progs = sampling.programs(
          model,
          master,
          prompt,
          prompt,
          num_samples=g,
          max_new_tokens=new_tokens,
          temperature=temperature,
          top_p=c.rollout.top_p,
          top_k=c.rollout.top_k,
          stop_ids=(model_cfg.vocab_size - 1,),  # the tokenizer's; any id compiles the same
          return_entropy=True,
          max_rows_in_flight=(
              rollout_lib.eval_rows_in_flight(run) if prefix else run.rollout.max_rows_in_flight
          ),
          prefill_chunks=run.rollout.prefill_chunks,
      )
      if serving is None:
        lowered = progs.serving_params(master)
        weights, shardings = _compile_rollout(
            "weights", lowered, (master,), 1, held - _shard_bytes(master)
        )
        out.append(weights)
        serving = _abstract(lowered.out_info, shardings or _unstacked(master))
      args = (serving, prompt, prompt, key)
      lowered = progs.prefill(*args)
      prefill, shardings = _compile_rollout(prefix + "prefill", lowered, args, 1, held)
      decode_state = lowered.out_info[0]
      decode_state = _abstract(
          decode_state, shardings[0] if shardings else _rows_or_replicated(decode_state, mesh)
      )
      steps = decode_steps(b * g, new_tokens, progs.rows_in_flight)
      args = (serving, decode_state)
      decode, _ = _compile_rollout(prefix + "decode", progs.decode(*args), args, steps, held)
      decode.counted_hbm_bytes = decode.costs.hbm_bytes
      decode.costs = dataclasses.replace(
          decode.costs, hbm_bytes=decode_step_bytes(serving, decode_state)
      )
      out += [prefill, decode]
  return out


def _unstacked(master) -> list:
  """The shardings of the serving weights (`sampling`'s cast and split of the stacked layers)
  when their program was not compiled: each layer's weight keeps its stacked sharding."""
  import jax.sharding as js

  def one(x):
    spec = x.sharding.spec
    return js.NamedSharding(x.sharding.mesh, js.PartitionSpec(*spec[1:]))

  layers = jax.tree.map(one, master["layers"])
  num_layers = jax.tree.leaves(master["layers"])[0].shape[0]
  rest = {k: jax.tree.map(lambda x: x.sharding, v) for k, v in master.items() if k != "layers"}
  return {**rest, "layers": tuple(layers for _ in range(num_layers))}


def _rows_or_replicated(tree, mesh):
  """Rows over the batch axes for arrays whose leading axis they divide, else replicated."""
  rows, shards = sharding.batch_sharding(mesh), sharding.row_shards(mesh)
  replicated = sharding.replicated_sharding(mesh)
  return jax.tree.map(lambda x: rows if x.ndim and x.shape[0] % shards == 0 else replicated, tree)


# ----------------------------------------------------------------------------- the report


def model_flops(c, model_cfg) -> float:
  """6 x parameters x tokens of one update (the usual MFU numerator; attention not counted)."""
  params = jax.eval_shape(lambda: models.init_params(model_cfg, jax.random.key(0)))
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  tokens = (
      c.rollout.prompts_per_step
      * c.rollout.num_samples
      * (c.task.max_prompt_len + c.rollout.max_new_tokens)
  )
  return 6.0 * n * tokens * c.rl.ppo_epochs


def shaping_fields(c, derived: bool, num_devices: int) -> str:
  """The fields that shape the update's collectives (`c` with its micro-batches resolved): a
  compiler refusal that is not for HBM is changed by changing one of them."""
  data, fsdp, tensor = config_lib.mesh_sizes(c, num_devices)
  rows = c.rollout.prompts_per_step * c.rollout.num_samples // c.rl.num_minibatches
  micro = c.rl.num_microbatches
  batching = (
      f"config.rl.microbatch_rows_per_device={c.rl.microbatch_rows_per_device} (try {2 * c.rl.microbatch_rows_per_device})"
      if derived
      else f"config.rl.num_microbatches={micro}"
  )
  return (
      f"Fields that shape it: {batching}: {micro} micro-batches of {rows // micro} rows; "
      f"config.mesh.data={data}, config.mesh.fsdp={fsdp}, config.mesh.tensor={tensor}"
  )


def advice(c, program: Program, limit: float, derived: bool = False) -> str:
  """The config fields to change so that `program` fits under `limit` bytes per chip (`c` with
  its micro-batches resolved; `derived`: from rl.microbatch_rows_per_device)."""
  over = (program.peak_bytes - limit) / GiB
  fields = []
  if program.temp_bytes > program.argument_bytes:
    micro, rows = c.rl.num_microbatches, (
        c.rollout.prompts_per_step * c.rollout.num_samples // c.rl.num_minibatches
    )
    larger = [m for m in range(micro + 1, rows + 1) if rows % m == 0]
    per_device = c.rl.microbatch_rows_per_device
    if derived and per_device > 1:
      fields.append(f"config.rl.microbatch_rows_per_device={per_device} -> {per_device // 2}")
    elif larger and not derived:
      fields.append(
          f"config.rl.num_microbatches={micro} -> {larger[0]} or more (divisors of "
          f"the {rows}-row mini-batch)"
      )
    if not c.model.remat:
      fields.append("config.model.remat=True")
    if c.model.attention_impl == "xla":
      fields.append(
          "config.model.attention_impl='xla' -> 'auto' (the splash kernel: no [heads, T, T] scores)"
      )
    if c.mesh.tensor == 1:
      fields.append(
          "config.mesh.tensor=2 or 4 (heads and MLP columns over chips: each holds that fraction "
          "of the layer activations)"
      )
    fields.append(f"config.rollout.max_new_tokens={c.rollout.max_new_tokens} (lower)")
  else:
    if c.mesh.data != 1:
      fields.append(
          f"config.mesh.data={c.mesh.data} -> 1 with config.mesh.fsdp=-1 (shard the "
          "state over every chip)"
      )
    fields.append(
        f"config.model.param_dtype={c.model.param_dtype!r}"
        + (" -> 'bfloat16'" if c.model.param_dtype == "float32" else "")
    )
  return (
      f"{program.name} needs {program.peak_bytes / GiB:.2f} GiB per chip, {over:.2f} GiB "
      f"over the {limit / GiB:.2f} GiB allowed; change "
      + "; or ".join(fields)
      + ", or use a larger slice"
  )


def rollout_advice(
    c,
    run,
    program: RolloutProgram,
    limit: float,
    model_cfg,
    num_devices: int,
    derived: bool,
    hbm_bytes: int,
) -> str:
  """The config fields to change so that sampler `program` fits under `limit` of a chip's
  `hbm_bytes` on `num_devices` (`c` with its rows in flight resolved, `run` its typed form;
  `derived`: from rollout.kv_cache_fraction)."""
  over = program.peak_bytes - limit
  head = (
      f"{program.name} needs {program.peak_bytes / GiB:.2f} GiB per chip (the training state "
      f"held while sampling included), {over / GiB:.2f} GiB over the {limit / GiB:.2f} GiB "
      "allowed; change "
  )
  if program.name == "weights":
    return head + (
        f"config.model.param_dtype={c.model.param_dtype!r}, or config.mesh (shard the state over "
        "more chips), or use a larger slice"
    )
  evaluating = program.name.startswith("eval-")
  from entropy_rl import rollout as rollout_lib

  rows = rollout_lib.eval_rows_in_flight(run) if evaluating else run.rollout.max_rows_in_flight
  new_tokens = c.rollout.max_new_tokens
  if evaluating and c.eval.max_new_tokens > 0:
    new_tokens = c.eval.max_new_tokens
  data, fsdp, mesh_tensor = config_lib.mesh_sizes(c, num_devices)
  shards = data * fsdp
  row_bytes = config_lib.kv_row_bytes(model_cfg, c.task.max_prompt_len + new_tokens, mesh_tensor)
  n = c.rollout.prompts_per_step * (c.eval.num_samples if evaluating else c.rollout.num_samples)
  in_flight = min(rows or n, n)
  fewer = (in_flight // shards - math.ceil(over / row_bytes)) * shards
  if fewer < shards:  # not one row per data shard would be left: rows are not the lever
    return head.removesuffix("change ") + (
        f"nothing the rows in flight can fix: {in_flight // shards} row(s) per data shard hold "
        f"{in_flight // shards * row_bytes / GiB:.2f} GiB of KV cache per chip; use a larger slice"
    )
  fields = []
  if evaluating and c.eval.max_rows_in_flight != -1:
    fields.append(f"config.eval.max_rows_in_flight={c.eval.max_rows_in_flight} -> {fewer}")
  elif derived:
    budget = math.floor(100 * fewer // shards * row_bytes / hbm_bytes) / 100
    fields.append(
        f"config.rollout.kv_cache_fraction={c.rollout.kv_cache_fraction} -> {budget:.2f} (the "
        f"KV budget: {rows} rows in flight -> {fewer})"
    )
  else:
    fields.append(
        f"config.rollout.max_rows_in_flight={c.rollout.max_rows_in_flight} -> {fewer} "
        "(or -1: derived from config.rollout.kv_cache_fraction)"
    )
  if evaluating and c.eval.max_rows_in_flight == -1:
    fields.append(f"config.eval.max_rows_in_flight=-1 -> {fewer} (evaluation only)")
  return head + "; or ".join(fields) + ", or use a larger slice"


def table(programs: list[Program], topology: Topology, mfu_flops: float | None) -> str:
  chip = topology.chip
  head = (
      f"{'program':<12} {'calls':>7} {'args':>8} {'temps':>8} {'peak':>8} {'HBM':>6} "
      f"{'TFLOP':>9} {'HBM GB':>9} {'ICI GB':>8} {'roofline s':>11}"
  )
  lines = [
      f"{topology.name} ({topology.generation}:{topology.shape}, {topology.num_chips} chips): "
      "per chip, GiB unless marked",
      head,
  ]
  total, evaluation = 0.0, 0.0
  for p in programs:
    s = p.seconds(chip)
    if p.name.startswith("eval-"):
      evaluation += s * p.calls
    else:
      total += s * p.calls
    costs = (
        f"{p.costs.flops / 1e12:>9.2f} {p.costs.hbm_bytes / 1e9:>9.2f} "
        f"{p.costs.ici_bytes / 1e9:>8.2f} {s:>11.3f}"
        if p.compiled
        else f"{'XLA:TPU refused it: out of HBM':>40}"
    )
    lines.append(
        f"{p.name:<12} {p.calls:>7} {p.argument_bytes / GiB:>8.2f} {p.temp_bytes / GiB:>8.2f} "
        f"{p.peak_bytes / GiB:>8.2f} {chip.hbm_bytes / GiB:>6.0f} {costs}"
    )
  for name, seconds in (("step", total), ("eval chunk", evaluation)):
    if seconds:
      lines.append(f"{name:<12} {'':>7} {'':>8} {'':>8} {'':>8} {'':>6} {'':>28} {seconds:>11.3f}")
  update = next((p for p in programs if p.name == "update"), None)
  if mfu_flops and update is not None and update.compiled:
    bound = mfu_flops / (topology.num_chips * chip.flops_per_s * update.seconds(chip))
    lines.append(f"update MFU bound (6 x params x tokens at the roofline time): {bound:.1%}")
  unknown = sum(p.costs.unknown_trip_counts for p in programs)
  if unknown:
    lines.append(f"({unknown} loops without a constant bound are counted once)")
  return "\n".join(lines)


def sampler_summary(c, run, programs: list[RolloutProgram]) -> str:
  """Rows in flight, decode steps, the training state held while sampling."""
  from entropy_rl import rollout as rollout_lib

  decode = {p.name: p for p in programs}
  lines = [
      f"sampler: peaks include the {decode['decode'].held_bytes / GiB:.2f} GiB training state held "
      "while sampling (the weights pass: without the master weights, its argument); decode "
      "costs are one step's, its calls the steps when every response runs to the end",
  ]
  for name, rows, g in (
      ("decode", run.rollout.max_rows_in_flight, c.rollout.num_samples),
      ("eval-decode", rollout_lib.eval_rows_in_flight(run), c.eval.num_samples),
  ):
    n, p = c.rollout.prompts_per_step * g, decode[name]
    lines.append(
        f"  {name}: {min(rows or n, n)} of {n} rows in flight, {p.calls} steps; a step's HBM GB "
        f"are the weights and KV cache it reads ({p.counted_hbm_bytes / 1e9:.2f} GB of traffic "
        "counted in the compiled step)"
    )
  return "\n".join(lines)


@dataclasses.dataclass
class Plan:
  topology: Topology
  hosts: int
  rows_per_host: int
  programs: list[Program]
  report: str
  problems: list[str]


def plan(c, topology: str | Topology, headroom: float = 0.1, training: bool = True) -> Plan:
  """Builds the mesh from the slice's devices as the trainer does, checks every host's rows, and
  compiles the programs of one RL step (without the update's when not `training`: the sampler's
  only); `problems` names the fields to change."""
  topo = parse_topology(topology) if isinstance(topology, str) else topology
  devices = topology_devices(topo)
  checked = c.copy_and_resolve_references()
  if checked.task.source == "jsonl":  # the data lives where the run does; only its path is read
    with checked.unlocked():
      checked.task.source = "tfds"
  config_lib.validate(checked, len(devices))
  derived = not c.rl.num_microbatches
  c = config_lib.resolve_microbatches(c, len(devices))
  mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, devices=devices)
  rows = sharding.batch_sharding(mesh)
  prompt_rows = distributed.rows_by_process(c.rollout.prompts_per_step, rows)
  distributed.rows_by_process(c.rollout.prompts_per_step * c.rollout.num_samples, rows)
  model_cfg = model_config(c)
  try:
    programs = training_programs(c, mesh, model_cfg) if training else []
  except CompileError as e:
    raise CompileError(f"{e} on {topo.name}. {shaping_fields(c, derived, len(devices))}") from e
  limit = (1.0 - headroom) * topo.chip.hbm_bytes
  problems = [advice(c, p, limit, derived) for p in programs if p.peak_bytes > limit]
  rows_derived = c.rollout.max_rows_in_flight == -1
  c = config_lib.resolve_rows_in_flight(c, len(devices), model_cfg, topo.chip.hbm_bytes)
  run = config_lib.typed(c, len(devices))
  try:
    sampler = rollout_programs(c, run, mesh, model_cfg)
  except CompileError as e:
    fields = "config.rollout.max_rows_in_flight, config.eval.max_rows_in_flight, config.mesh.*"
    raise CompileError(f"{e} on {topo.name}. Fields that shape it: {fields}") from e
  programs += sampler
  problems += [
      rollout_advice(c, run, p, limit, model_cfg, len(devices), rows_derived, topo.chip.hbm_bytes)
      for p in sampler
      if p.peak_bytes > limit
  ]
  first = next(iter(prompt_rows.values()))
  report = (
      f"mesh {dict(mesh.shape)} over {len(prompt_rows)} hosts; each host feeds "
      f"{first.stop - first.start} of {c.rollout.prompts_per_step} prompts per step\n"
      + table(programs, topo, model_flops(c, model_cfg))
      + "\n"
      + sampler_summary(c, run, sampler)
  )
  return Plan(topo, len(prompt_rows), first.stop - first.start, programs, report, problems)


def main(argv) -> int:
  del argv
  from absl import flags

  jax.config.update("jax_platforms", "cpu")  # the slice comes from libtpu; nothing runs here
  jax.config.update("jax_threefry_partitionable", True)
  try:
    result = plan(
        flags.FLAGS.config,
        flags.FLAGS.topology,
        flags.FLAGS.headroom,
        training=not flags.FLAGS.sampler_only,
    )
  except CompileError as e:
    print(f"CANNOT COMPILE: {e}", file=sys.stderr)
    return 1
  print(result.report)
  for problem in result.problems:
    print(f"DOES NOT FIT: {problem}", file=sys.stderr)
  return 1 if result.problems else 0


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  config_flags.DEFINE_config_file(
      "config", None, "ml-collections config file[:preset].", lock_config=True
  )
  flags.DEFINE_string("topology", None, "gcloud accelerator type (v5p-64) or topology (v5p:2x4x4).")
  flags.DEFINE_float("headroom", 0.1, "Fraction of each chip's HBM a program must leave free.")
  flags.DEFINE_bool(
      "sampler_only", False, "Compile the rollout and evaluation programs only (not the update)."
  )
  flags.mark_flags_as_required(["config", "topology"])
  app.run(lambda argv: sys.exit(main(argv)))
