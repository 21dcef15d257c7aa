import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from entropy_rl import sharding


def test_make_mesh_sizes_and_auto_axes():
  mesh = sharding.make_mesh(data=-1, fsdp=2, tensor=2)
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert mesh.axis_types == (AxisType.Auto,) * 3
  assert dict(sharding.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert dict(sharding.make_mesh(data=1, fsdp=-1).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  sub = sharding.make_mesh(data=2, devices=jax.devices()[:2])
  assert sub.devices.size == 2


@pytest.mark.parametrize(
    "kw, key",
    [
        (dict(data=-1, fsdp=3), "config.mesh.data"),
        (dict(data=3, fsdp=1, tensor=1), "config.mesh.data"),
        (dict(data=2, fsdp=2, tensor=4), "config.mesh.data"),
        (dict(data=-1, fsdp=-1), "config.mesh.fsdp"),
        (dict(data=-1, tensor=0), "config.mesh.tensor"),
    ],
)
def test_make_mesh_bad_sizes_name_the_key(kw, key):
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    sharding.make_mesh(**kw)


def test_logical_rules_divisibility_and_fallback():
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  rules = sharding.default_rules()
  axes = {
      "embed": ("vocab", "embed"),
      "q": ("embed", "heads", "head_dim"),
      "tiny": ("embed", "mlp"),  # 3 x 5: nothing divides, replicated.
      "norm": ("norm",),
      "scalar": None,
  }
  shapes = {
      "embed": jax.ShapeDtypeStruct((16, 8), jnp.float32),
      "q": jax.ShapeDtypeStruct((8, 4, 2), jnp.float32),
      "tiny": jax.ShapeDtypeStruct((3, 5), jnp.float32),
      "norm": np.zeros((8,)),
      "scalar": np.zeros(()),
  }
  out = sharding.logical_to_mesh_sharding(axes, mesh, rules, shapes)
  assert out["embed"].spec == P("tensor", "fsdp")
  assert out["q"].spec == P("fsdp", "tensor", None)
  assert out["tiny"].spec == P(None, None)
  assert out["norm"].spec == P(None)
  assert out["scalar"].spec == P()
  assert all(s.mesh is mesh for s in jax.tree.leaves(out))


def test_tuple_rule_skips_non_dividing_axis_and_repeats():
  mesh = sharding.make_mesh(data=2, fsdp=4, tensor=1)
  rules = [("batch", ("data", "fsdp")), ("x", "fsdp"), ("y", ("fsdp", "data"))]
  spec = lambda axes, shape: sharding.logical_to_pspec(axes, shape, mesh, rules)
  assert spec(("batch",), (16,)) == P(("data", "fsdp"))
  assert spec(("batch",), (6,)) == P("data")  # fsdp=4 does not divide 6 (after data=2).
  assert spec(("batch",), (4,)) == P("data")  # 2*4 does not divide 4: fsdp dropped.
  assert spec(("x", "y"), (8, 8)) == P("fsdp", "data")  # fsdp used once only.
  assert spec(("x",), None) == P("fsdp")  # Without shapes: rules as written.


def test_sharded_arrays_place_as_specified():
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  params = {"w": jnp.arange(64.0).reshape(8, 8)}
  shard = sharding.logical_to_mesh_sharding(
      {"w": ("embed", "mlp")}, mesh, sharding.default_rules(), params
  )
  w = jax.device_put(params["w"], shard["w"])
  assert w.addressable_shards[0].data.shape == (4, 4)
  np.testing.assert_array_equal(np.asarray(w), np.asarray(params["w"]))
  x = jax.device_put(jnp.zeros((8, 3)), sharding.batch_sharding(mesh))
  assert x.addressable_shards[0].data.shape == (2, 3)
  assert sharding.replicated_sharding(mesh).spec == P()


def test_bad_rules_and_unknown_logical_names():
  mesh = sharding.make_mesh(data=8)
  with pytest.raises(ValueError, match="'model' is not a mesh axis"):
    sharding.logical_to_mesh_sharding({"w": ("embed",)}, mesh, [("embed", "model")])
  with pytest.raises(ValueError, match=r"\['w'\].*'experts' has no sharding rule"):
    sharding.logical_to_mesh_sharding({"w": ("experts",)}, mesh, sharding.default_rules())
  with pytest.raises(ValueError, match="do not match shape"):
    sharding.logical_to_mesh_sharding(
        {"w": ("embed",)}, mesh, sharding.default_rules(), {"w": np.zeros((2, 2))}
    )


MULTI_HOST = ("v4-16", "v4-32", "v5litepod-16", "v5e-64", "v5p-16", "v5p-64", "v6e-16")


def _topology_devices(name):
  pytest.importorskip("libtpu")
  from entropy_rl import plan

  return plan.topology_devices(plan.parse_topology(name))


def _host_of(mesh):
  return np.vectorize(lambda d: d.process_index)(mesh.devices)


@pytest.mark.parametrize("name", MULTI_HOST)
@pytest.mark.parametrize("sizes", [(1, -1, 1), (2, -1, 1), (-1, 1, 1), (1, -1, 2), (1, 2, -1)])
def test_multi_host_mesh_gives_each_host_one_block(name, sizes):
  devices = _topology_devices(name)
  per_host = len(devices) // len({d.process_index for d in devices})
  assert per_host < len(devices)
  mesh = sharding.make_mesh(*sizes, devices=devices)
  hosts = _host_of(mesh)
  tensor = mesh.shape["tensor"]
  if tensor <= per_host:  # 'tensor' never leaves a host when it fits in one
    assert (hosts == hosts[..., :1]).all()
  # Each host holds one contiguous run of the flattened (data, fsdp) batch positions.
  rows = hosts.reshape(-1, tensor)
  for p in np.unique(hosts):
    at = np.flatnonzero((rows == p).any(axis=1))
    assert (np.diff(at) == 1).all(), (p, at)


@pytest.mark.parametrize("name", ["v5p-64", "v5e-64"])
def test_consecutive_hosts_along_fsdp_are_neighbours(name):
  mesh = sharding.make_mesh(1, -1, 1, devices=_topology_devices(name))
  ring = mesh.devices[0, :, 0]
  corners = []
  for d in ring:
    if not corners or corners[-1][0] != d.process_index:
      host = [e for e in ring if e.process_index == d.process_index]
      corners.append((d.process_index, np.min([e.coords for e in host], axis=0)))
  steps = [np.count_nonzero(a[1] != b[1]) for a, b in zip(corners, corners[1:])]
  assert steps == [1] * (len(corners) - 1)


class _FakeDevice:

  def __init__(self, i, process_index):
    self.id, self.process_index = i, process_index
    self.platform = self.device_kind = "fake"

  def __repr__(self):
    return f"D{self.id}@{self.process_index}"


@pytest.mark.parametrize(
    "shape, block",
    [
        ((1, 16, 1), (1, 4, 1)),
        ((4, 2, 2), (1, 2, 2)),
        ((8, 1, 2), (2, 1, 2)),
        ((1, 2, 8), (1, 1, 4)),
        ((2, 8, 1), (1, 4, 1)),
    ],
)
def test_host_blocked_devices_without_a_tpu(shape, block):
  # Hosts interleaved by id, as a physical layout may number them.
  devices = [_FakeDevice(i, i % 4) for i in range(16)]
  grid = sharding.host_blocked_devices(shape, devices)
  hosts = np.vectorize(lambda d: d.process_index)(grid)
  assert grid.shape == shape
  for p in range(4):
    at = np.argwhere(hosts == p)
    assert tuple(at.max(0) - at.min(0) + 1) == block


def test_host_blocked_devices_names_fsdp_when_no_block_fits():
  devices = [_FakeDevice(i, i // 8) for i in range(48)]
  with pytest.raises(ValueError, match=r"config\.mesh\.fsdp=6"):
    sharding.host_blocked_devices((8, 6, 1), devices)


def test_row_shards_counts_the_batch_axes_devices():
  assert sharding.row_shards(sharding.make_mesh(2, 2, 2)) == 4
  assert sharding.row_shards(sharding.make_mesh(1, 8, 1)) == 8
  assert sharding.row_shards(sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])) == 1
