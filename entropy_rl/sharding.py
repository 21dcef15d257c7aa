"""Device mesh and logical-axis sharding rules.

The mesh has axes ('data', 'fsdp', 'tensor'), all `AxisType.Auto` (classic GSPMD: the compiler
propagates shardings; `jax.make_mesh` would otherwise default to Explicit). Parameters carry one
logical axis name per dimension (`embed`, `vocab`, `heads`, ...); rules map each name to mesh axes.
A mesh axis that does not divide a dimension is skipped for that dimension, so tiny models on a
large mesh fall back to replication instead of failing.

On a multi-host slice every host must feed one contiguous block of batch rows, so `make_mesh`
lays the devices out host by host (`host_blocked_devices`): each host's devices form a block of the
mesh with 'tensor' innermost (inside a host where it fits), the hosts in a snake over their
physical positions so consecutive blocks of an 'fsdp' or 'data' ring are ICI neighbours.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

Rules = Sequence[tuple[str, Any]]


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
  """Builds a ('data', 'fsdp', 'tensor') mesh with Auto axes; one size may be -1 (the rest)."""
  devices = jax.devices() if devices is None else list(devices)
  n = len(devices)
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  for name, size in sizes.items():
    if (
        not isinstance(size, (int, np.integer))
        or isinstance(size, bool)
        or (size < 1 and size != -1)
    ):
      raise ValueError(f"config.mesh.{name} must be a positive integer or -1, got {size!r}")
  rest = [name for name, size in sizes.items() if size == -1]
  if len(rest) > 1:
    raise ValueError(
        "only one of config.mesh.{data,fsdp,tensor} may be -1, got -1 for "
        + ", ".join(f"config.mesh.{name}" for name in rest)
    )
  fixed = math.prod(size for size in sizes.values() if size != -1)
  desc = ", ".join(f"config.mesh.{k}={v}" for k, v in sizes.items())
  if rest:
    if n % fixed:
      raise ValueError(
          f"config.mesh.{rest[0]}=-1 takes the rest of {n} devices, but the other axes "
          f"({desc}) multiply to {fixed}, which does not divide {n}"
      )
    sizes[rest[0]] = n // fixed
  elif fixed != n:
    bad = next((k for k, v in sizes.items() if n % v), "data")
    raise ValueError(
        f"mesh sizes ({desc}) multiply to {fixed} but there are {n} devices; set "
        f"config.mesh.{bad} so the product is {n}, or -1 for the rest"
    )
  shape = tuple(sizes[a] for a in MESH_AXES)
  if len({d.process_index for d in devices}) == 1:
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )
  return Mesh(
      host_blocked_devices(shape, devices), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES)
  )


def _host_shape(shape: tuple[int, int, int], per_host: int) -> tuple[int, int, int]:
  """The (data, fsdp, tensor) block one host's `per_host` devices fill, so that its batch rows
  (over data x fsdp, row-major) are contiguous: tensor first, then fsdp, then whole fsdp rows."""
  data, fsdp, tensor = shape
  t = math.gcd(tensor, per_host)
  f = math.gcd(fsdp, per_host // t)
  d = per_host // (t * f)
  if d > 1 and (f != fsdp or data % d):
    raise ValueError(
        f"config.mesh.fsdp={fsdp}: a host's {per_host} devices cannot hold one contiguous block "
        f"of batch rows of the (data, fsdp, tensor) = {shape} mesh; make config.mesh.fsdp a "
        f"multiple or a divisor of {per_host // t} devices per host"
    )
  return d, f, t


def _snake(grid: tuple[int, ...]) -> list[tuple[int, ...]]:
  """Every index of an N-d grid once, consecutive indices one step apart (boustrophedon)."""
  if len(grid) == 1:
    return [(i,) for i in range(grid[0])]
  inner = _snake(grid[:-1])
  return [idx + (k,) for k in range(grid[-1]) for idx in (inner if k % 2 == 0 else inner[::-1])]


def _hosts_in_snake_order(devices) -> list[list]:
  """Devices grouped by process, the groups ordered along a snake over the hosts' positions (the
  smallest chip coordinates of each host; process order where devices have no coordinates)."""
  hosts: dict[int, list] = {}
  for d in devices:
    hosts.setdefault(d.process_index, []).append(d)
  if not all(hasattr(d, "coords") for d in devices):
    return [hosts[p] for p in sorted(hosts)]
  corner = {
      p: tuple(min(d.coords[i] for d in ds) for i in range(len(ds[0].coords)))
      for p, ds in hosts.items()
  }
  axes = [sorted({c[i] for c in corner.values()}) for i in range(len(next(iter(corner.values()))))]
  at = {tuple(a.index(c[i]) for i, a in enumerate(axes)): p for p, c in corner.items()}
  order = [at[idx] for idx in _snake(tuple(len(a) for a in axes)) if idx in at]
  return (
      [hosts[p] for p in order] if len(order) == len(hosts) else [hosts[p] for p in sorted(hosts)]
  )


def host_blocked_devices(shape: tuple[int, int, int], devices) -> np.ndarray:
  """A (data, fsdp, tensor) device array in which every process's devices form one block that
  holds one contiguous range of batch rows; within a host, the topology-aware layout of
  `mesh_utils.create_device_mesh`."""
  hosts = _hosts_in_snake_order(devices)
  per_host = {len(h) for h in hosts}
  if len(per_host) != 1:
    raise ValueError(f"every process must hold the same number of devices, got {sorted(per_host)}")
  block = _host_shape(shape, per_host.pop())
  grid = tuple(s // b for s, b in zip(shape, block))
  return mesh_utils.create_hybrid_device_mesh(
      block,
      grid,
      [d for h in hosts for d in h],
      process_is_granule=True,
      should_sort_granules_by_key=False,
      allow_split_physical_axes=True,
  )


def default_rules() -> tuple[tuple[str, Any], ...]:
  """Logical axis name -> mesh axes. Batch over data x fsdp, weights FSDP on embed, TP elsewhere."""
  return (
      ("batch", BATCH_AXES),
      ("cache_batch", BATCH_AXES),
      ("embed", "fsdp"),
      ("vocab", "tensor"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("mlp", "tensor"),
      ("head_dim", None),
      ("layers", None),
      ("norm", None),
      ("length", None),
  )


def decode_rules() -> tuple[tuple[str, Any], ...]:
  """The rules of a decode step (one new token a row): activation rows over 'data' only, so each
  matmul contracts the FSDP-sharded weight where it lies and all-reduces the small [rows, features]
  partial sums over 'fsdp', instead of all-gathering every weight every step (weight-stationary
  serving); the KV cache and the attention over it stay split over data x fsdp (`cache_batch`)."""
  return (("batch", "data"),) + default_rules()


def _is_axes_leaf(x) -> bool:
  return x is None or (isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x))


def _rules_dict(rules: Rules, mesh: Mesh) -> dict[str, tuple[str, ...]]:
  out = {}
  for pair in rules:
    if len(pair) != 2:
      raise ValueError(f"sharding rules must be (logical_name, mesh_axes) pairs, got {pair!r}")
    name, axes = pair
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    for a in axes:
      if a not in mesh.axis_names:
        raise ValueError(
            f"sharding rule {name!r} -> {a!r}: {a!r} is not a mesh axis {mesh.axis_names}"
        )
    out.setdefault(name, axes)  # First match wins, as in flax.
  return out


def logical_to_pspec(
    logical_axes: tuple, shape: tuple[int, ...] | None, mesh: Mesh, rules: Rules, path: str = ""
) -> P:
  """PartitionSpec for one leaf; drops mesh axes that do not divide the dimension or repeat."""
  rules_d = _rules_dict(rules, mesh)
  if shape is not None and len(shape) != len(logical_axes):
    raise ValueError(f"{path or 'leaf'}: logical axes {logical_axes} do not match shape {shape}")
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(logical_axes):
    if name is None:
      spec.append(None)
      continue
    if name not in rules_d:
      raise ValueError(
          f"{path or 'leaf'}: logical axis {name!r} has no sharding rule; add "
          f"({name!r}, <mesh axis or None>) to the rules (known: {sorted(rules_d)})"
      )
    kept, size = [], 1
    for a in rules_d[name]:
      if a in used:
        continue
      a_size = mesh.shape[a]
      if shape is not None and shape[dim] % (size * a_size):
        continue
      kept.append(a)
      size *= a_size
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*spec)


def logical_to_mesh_sharding(logical_axes_tree, mesh: Mesh, rules: Rules, shapes_tree=None):
  """Tree of logical-axis tuples -> tree of NamedSharding.

  `shapes_tree` (same structure; arrays or ShapeDtypeStructs, e.g. from `jax.eval_shape`) lets a
  mesh axis that does not divide a dimension fall back to replication for that dimension. Leaves
  that are None are replicated.
  """

  def one(path, axes, leaf=None):
    if axes is None:
      return NamedSharding(mesh, P())
    shape = None if leaf is None else tuple(leaf.shape)
    return NamedSharding(
        mesh, logical_to_pspec(axes, shape, mesh, rules, jax.tree_util.keystr(path))
    )

  if shapes_tree is None:
    return jax.tree_util.tree_map_with_path(one, logical_axes_tree, is_leaf=_is_axes_leaf)
  return jax.tree_util.tree_map_with_path(
      one, logical_axes_tree, shapes_tree, is_leaf=_is_axes_leaf
  )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over ('data', 'fsdp'); other dimensions replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def row_shards(mesh: Mesh) -> int:
  """How many blocks `batch_sharding` splits the rows into: the batch axes' devices."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """Fully replicated (scalars, step counters, PRNG keys)."""
  return NamedSharding(mesh, P())


def under_mesh(jitted, mesh: Mesh, rules: Rules):
  """`jitted` called and lowered with `mesh` set and the logical rules on, so that while it is
  traced flax's `nn.with_logical_constraint` applies (without a mesh it is a silent no-op and XLA
  may all-gather activations instead of weights)."""

  @functools.wraps(jitted)
  def call(*args, **kwargs):
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
      return jitted(*args, **kwargs)

  def lower(*args, **kwargs):
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
      return jitted.lower(*args, **kwargs)

  call.lower = lower
  return call


def split_rows(tree, num: int):
  """[N, ...] -> [num, N / num, ...] for every leaf, strided: split i holds rows i, i + num, ...
  Each split of a batch whose rows are in contiguous blocks over devices keeps its rows on their
  devices, evenly spread."""

  def f(x):
    return jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1)

  return jax.tree.map(f, tree)


def merge_rows(tree):
  """Inverse of `split_rows`."""

  def f(x):
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])

  return jax.tree.map(f, tree)
