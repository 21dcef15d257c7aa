import jax
import numpy as np
import pytest

from entropy_rl import distributed, sharding

_ENV = (
    "ENTROPY_RL_DISTRIBUTED",
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
    "TPU_PROCESS_ADDRESSES",
    "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_COORDINATOR_ADDRESS",
    "SLURM_JOB_ID",
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
)


@pytest.fixture
def calls(monkeypatch):
  for name in _ENV:
    monkeypatch.delenv(name, raising=False)
  recorded = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: recorded.append(kw))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  return recorded


def test_single_process_does_not_initialize(calls):
  assert distributed.detect_multihost() is None
  assert distributed.maybe_initialize("auto") == (0, 1)
  assert distributed.maybe_initialize("off") == (0, 1)
  assert calls == []


@pytest.mark.parametrize(
    "env, reason",
    [
        ({"ENTROPY_RL_DISTRIBUTED": "1"}, "ENTROPY_RL_DISTRIBUTED"),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS"),
        ({"TPU_WORKER_HOSTNAMES": "10.0.0.1,10.0.0.2"}, "TPU_WORKER_HOSTNAMES"),
        ({"TPU_WORKER_HOSTNAMES": "10.0.0.1"}, None),
        ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1"}, "MEGASCALE_COORDINATOR_ADDRESS"),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, "SLURM_NTASKS"),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_SIZE"),
    ],
)
def test_detect_multihost(calls, monkeypatch, env, reason):
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  assert distributed.detect_multihost() == reason
  distributed.maybe_initialize("auto")
  assert len(calls) == (reason is not None)
  calls.clear()
  distributed.maybe_initialize("off")
  assert calls == []


def test_explicit_process_env_and_flag_on(calls, monkeypatch):
  distributed.maybe_initialize("on")
  assert calls == [{}]
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "1")
  distributed.maybe_initialize("auto")
  assert calls[-1] == {"num_processes": 2, "process_id": 1}
  monkeypatch.setenv("JAX_PROCESS_ID", "one")
  with pytest.raises(ValueError, match="JAX_PROCESS_ID='one'"):
    distributed.maybe_initialize("auto")


def test_bad_flag_and_failed_initialize(calls, monkeypatch):
  with pytest.raises(ValueError, match="config.distributed"):
    distributed.maybe_initialize("yes")

  def fail(**kw):
    raise ValueError("coordinator_address should be defined.")

  monkeypatch.setattr(jax.distributed, "initialize", fail)
  with pytest.raises(RuntimeError, match="JAX_COORDINATOR_ADDRESS=host:port"):
    distributed.maybe_initialize("on")


def test_process_rows():
  mesh = sharding.make_mesh(data=2, fsdp=4)
  batch = sharding.batch_sharding(mesh)
  assert distributed.process_rows(16, batch) == slice(0, 16)
  # A host owning the devices of data index 1 feeds the second half.
  assert distributed.process_rows(16, batch, devices=mesh.devices[1, :, 0]) == slice(8, 16)
  assert distributed.process_rows(16, batch, devices=mesh.devices[0, 2:, 0]) == slice(4, 8)
  with pytest.raises(ValueError, match="not contiguous"):
    distributed.process_rows(16, batch, devices=mesh.devices[:, 0, 0])
  with pytest.raises(ValueError, match="global batch size 6"):
    distributed.process_rows(6, batch)
  # Replicated over 'tensor': both tensor shards of a row range feed the same rows.
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  batch = sharding.batch_sharding(mesh)
  assert distributed.process_rows(8, batch, devices=mesh.devices[0, 1, :]) == slice(2, 4)


def test_rows_by_process():
  mesh = sharding.make_mesh(data=2, fsdp=4)
  batch = sharding.batch_sharding(mesh)
  assert distributed.rows_by_process(16, batch) == {0: slice(0, 16)}


@pytest.mark.parametrize("name", ["v4-32", "v5e-64", "v5p-64", "v6e-16"])
def test_every_host_of_a_pod_feeds_its_block(name):
  pytest.importorskip("libtpu")
  from entropy_rl import plan

  devices = plan.topology_devices(plan.parse_topology(name))
  hosts = len({d.process_index for d in devices})
  mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=1, devices=devices)
  rows = distributed.rows_by_process(256, sharding.batch_sharding(mesh))
  assert len(rows) == hosts
  assert sorted((r.start, r.stop) for r in rows.values()) == [
      (i * 256 // hosts, (i + 1) * 256 // hosts) for i in range(hosts)
  ]
  for p, r in rows.items():
    assert distributed.process_shard(
        256, sharding.batch_sharding(mesh), [d for d in devices if d.process_index == p]
    ) == (r.start // (256 // hosts), hosts)
  by_x = sorted(devices, key=lambda d: tuple(d.coords))  # a column of chips spans hosts
  interleaved = jax.sharding.Mesh(np.array(by_x).reshape(1, -1, 1), sharding.MESH_AXES)
  with pytest.raises(ValueError, match="not contiguous"):
    distributed.rows_by_process(256, sharding.batch_sharding(interleaved))


def test_to_global_and_back():
  mesh = sharding.make_mesh(data=2, fsdp=4)
  local = np.arange(32).reshape(16, 2)
  out = distributed.to_global(local, mesh)
  assert out.sharding == sharding.batch_sharding(mesh) and out.shape == (16, 2)
  assert out.addressable_shards[0].data.shape == (2, 2)  # rows over the 8 data-parallel devices
  np.testing.assert_array_equal(distributed.to_local(out), local)
