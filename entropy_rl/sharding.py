"""Device mesh and logical-axis sharding rules.

The mesh has axes ('data', 'fsdp', 'tensor'), all `AxisType.Auto` (classic GSPMD: the compiler
propagates shardings; `jax.make_mesh` would otherwise default to Explicit). Parameters carry one
logical axis name per dimension (`embed`, `vocab`, `heads`, ...); rules map each name to mesh axes.
A mesh axis that does not divide a dimension is skipped for that dimension, so tiny models on a
large mesh fall back to replication instead of failing.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
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
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (
        size < 1 and size != -1):
      raise ValueError(f"config.mesh.{name} must be a positive integer or -1, got {size!r}")
  rest = [name for name, size in sizes.items() if size == -1]
  if len(rest) > 1:
    raise ValueError(
        f"only one of config.mesh.{{data,fsdp,tensor}} may be -1, got -1 for "
        + ", ".join(f"config.mesh.{name}" for name in rest))
  fixed = math.prod(size for size in sizes.values() if size != -1)
  desc = ", ".join(f"config.mesh.{k}={v}" for k, v in sizes.items())
  if rest:
    if n % fixed:
      raise ValueError(
          f"config.mesh.{rest[0]}=-1 takes the rest of {n} devices, but the other axes "
          f"({desc}) multiply to {fixed}, which does not divide {n}")
    sizes[rest[0]] = n // fixed
  elif fixed != n:
    bad = next((k for k, v in sizes.items() if n % v), "data")
    raise ValueError(
        f"mesh sizes ({desc}) multiply to {fixed} but there are {n} devices; set "
        f"config.mesh.{bad} so the product is {n}, or -1 for the rest")
  shape = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def default_rules() -> tuple[tuple[str, Any], ...]:
  """Logical axis name -> mesh axes. Batch over data x fsdp, weights FSDP on embed, TP elsewhere."""
  return (
      ("batch", BATCH_AXES),
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
            f"sharding rule {name!r} -> {a!r}: {a!r} is not a mesh axis {mesh.axis_names}")
    out.setdefault(name, axes)  # First match wins, as in flax.
  return out


def logical_to_pspec(logical_axes: tuple, shape: tuple[int, ...] | None, mesh: Mesh,
                     rules: Rules, path: str = "") -> P:
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
          f"({name!r}, <mesh axis or None>) to the rules (known: {sorted(rules_d)})")
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
    return NamedSharding(mesh, logical_to_pspec(axes, shape, mesh, rules,
                                                jax.tree_util.keystr(path)))

  if shapes_tree is None:
    return jax.tree_util.tree_map_with_path(one, logical_axes_tree, is_leaf=_is_axes_leaf)
  return jax.tree_util.tree_map_with_path(one, logical_axes_tree, shapes_tree,
                                          is_leaf=_is_axes_leaf)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over ('data', 'fsdp'); other dimensions replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """Fully replicated (scalars, step counters, PRNG keys)."""
  return NamedSharding(mesh, P())


# The names INTERFACES.md uses.
logical_to_sharding = logical_to_mesh_sharding
data_sharding = batch_sharding
