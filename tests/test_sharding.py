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


@pytest.mark.parametrize("kw, key", [
    (dict(data=-1, fsdp=3), "config.mesh.data"),
    (dict(data=3, fsdp=1, tensor=1), "config.mesh.data"),
    (dict(data=2, fsdp=2, tensor=4), "config.mesh.data"),
    (dict(data=-1, fsdp=-1), "config.mesh.fsdp"),
    (dict(data=-1, tensor=0), "config.mesh.tensor"),
])
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
  shard = sharding.logical_to_mesh_sharding({"w": ("embed", "mlp")}, mesh,
                                            sharding.default_rules(), params)
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
    sharding.logical_to_mesh_sharding({"w": ("embed",)}, mesh, sharding.default_rules(),
                                      {"w": np.zeros((2, 2))})
