"""Multi-host JAX: start-up, and which slice of a global batch each process feeds.

Every process runs the same program on a global (mesh-wide) batch; a process holds data only for
its own devices. `process_rows` says which rows of the global batch those are, so each host loads
only its shard of the prompts, and `to_global` assembles the global `jax.Array`s from the per-host
NumPy slices.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from entropy_rl import sharding as sharding_lib

log = logging.getLogger(__name__)

FLAGS = ("auto", "on", "off")
# Set by launch_tpu.sh on every worker; read when the flag is 'auto'.
LAUNCH_ENV = "ENTROPY_RL_DISTRIBUTED"


def _int_env(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def detect_multihost() -> str | None:
  """Why the environment looks like a multi-process launch (a short reason), or None.

  Reads environment variables only: nothing here may initialise a JAX backend.
  """
  env = os.environ
  if env.get(LAUNCH_ENV, "").lower() in ("1", "on", "true"):
    return LAUNCH_ENV
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  for name in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):  # GKE / TPU pod slices.
    if len([h for h in env.get(name, "").split(",") if h.strip()]) > 1:
      return name
  if env.get("MEGASCALE_COORDINATOR_ADDRESS"):  # Multislice TPU.
    return "MEGASCALE_COORDINATOR_ADDRESS"
  if "SLURM_JOB_ID" in env and (_int_env("SLURM_NTASKS") or 1) > 1:
    return "SLURM_NTASKS"
  if (_int_env("OMPI_COMM_WORLD_SIZE") or 1) > 1:
    return "OMPI_COMM_WORLD_SIZE"
  return None


def maybe_initialize(flag: str = "auto") -> tuple[int, int]:
  """Calls `jax.distributed.initialize()` when needed; returns (process_index, process_count).

  flag: 'off' never initialises; 'on' always does (cluster auto-detection: Cloud TPU, SLURM,
  Open MPI, or JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID); 'auto' does when
  `detect_multihost()` finds a multi-process launch. Call it before anything touches a device.
  """
  if flag not in FLAGS:
    raise ValueError(f"config.distributed must be one of {FLAGS}, got {flag!r}")
  reason = (
      detect_multihost()
      if flag == "auto"
      else ("config.distributed='on'" if flag == "on" else None)
  )
  if reason is not None and not jax.distributed.is_initialized():
    kwargs = {}
    num, pid = _int_env("JAX_NUM_PROCESSES"), _int_env("JAX_PROCESS_ID")
    if num is not None:
      kwargs["num_processes"] = num
    if pid is not None:
      kwargs["process_id"] = pid
    log.info("jax.distributed.initialize(%s) (%s)", kwargs, reason)
    try:
      jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as e:
      raise RuntimeError(
          f"jax.distributed.initialize() failed ({reason}): {e}. Outside Cloud TPU/SLURM/Open "
          "MPI set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or "
          "use config.distributed='off' for one process"
      ) from e
  return jax.process_index(), jax.process_count()


def process_rows(global_batch_size: int, sharding: jax.sharding.Sharding, devices=None) -> slice:
  """Rows of a global batch (leading dimension under `sharding`) that `devices` hold.

  `devices` defaults to this process's devices. The rows must be contiguous, which holds for
  meshes from `sharding.make_mesh` (each host's devices form one block along the batch axes).
  """
  ndim = len(getattr(sharding, "spec", ())) or 1
  shape = (global_batch_size,) + (1,) * (ndim - 1)
  try:
    index_map = sharding.devices_indices_map(shape)
  except ValueError as e:
    raise ValueError(
        f"global batch size {global_batch_size} cannot be split by {sharding}: " f"{e}"
    ) from None
  devices = sharding.addressable_devices if devices is None else devices
  spans = sorted({index_map[d][0].indices(global_batch_size)[:2] for d in devices})
  start, stop = spans[0]
  for s, e in spans[1:]:
    if s != stop:
      raise ValueError(
          f"the rows these devices hold are not contiguous ({spans}); build the "
          "mesh with sharding.make_mesh, which gives each host one block of rows"
      )
    stop = e
  return slice(start, stop)


def rows_by_process(
    global_batch_size: int, sharding: jax.sharding.Sharding, devices=None
) -> dict[int, slice]:
  """`process_rows` for every process owning some of `devices` (default: all of the sharding's).

  Checks what a multi-host start needs: each process feeds one contiguous block, all blocks have
  one size, and together they cover the batch (processes may share a block, as over 'tensor').
  """
  devices = list(sharding.device_set) if devices is None else list(devices)
  hosts = sorted({d.process_index for d in devices})
  rows = {
      p: process_rows(global_batch_size, sharding, [d for d in devices if d.process_index == p])
      for p in hosts
  }
  sizes = {r.stop - r.start for r in rows.values()}
  covered = set().union(*(range(r.start, r.stop) for r in rows.values()))
  if len(sizes) != 1 or len(covered) != global_batch_size:
    raise ValueError(
        f"the processes' rows of a global batch of {global_batch_size} are not equal "
        f"blocks that cover it: {rows}"
    )
  return rows


def process_shard(
    global_batch_size: int, sharding: jax.sharding.Sharding, devices=None
) -> tuple[int, int]:
  """(shard_index, num_shards): `devices` (default: this process's) feed block shard_index of the
  global batch cut into num_shards equal blocks of rows, the blocks a sharded data source reads."""
  rows = process_rows(global_batch_size, sharding, devices)
  n = rows.stop - rows.start
  return rows.start // n, global_batch_size // n


# ----------------------------------------------------------------------------- host <-> global


def device_memory() -> int | None:
  """Bytes one local device may allocate (`memory_stats()['bytes_limit']`), None if unreported."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


def to_global(x_local: np.ndarray, mesh) -> jax.Array:
  """This host's rows -> a global array with rows over the batch axes ('data', 'fsdp')."""
  return jax.make_array_from_process_local_data(sharding_lib.batch_sharding(mesh), x_local)


def to_local(x: jax.Array) -> np.ndarray:
  """The rows of a row-sharded global array that this host holds, in order."""
  if x.is_fully_addressable:
    return np.asarray(x)
  shards = {s.index[0].start or 0: s for s in x.addressable_shards}
  return np.concatenate([np.asarray(shards[k].data) for k in sorted(shards)])


def gather(x: np.ndarray) -> np.ndarray:
  """Concatenate a small per-host array over hosts (identity on one host)."""
  if jax.process_count() == 1:
    return x
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def any_process(flag: bool) -> bool:
  """True on every host when `flag` is true on any (a stop request that all hosts must act on)."""
  return bool(np.max(gather(np.array([int(flag)], np.int32))))


def gather_states(state: dict) -> dict:
  """Every host's JSON-able data position, keyed by process index."""
  if jax.process_count() == 1:
    return {"0": state}
  blob = np.frombuffer(json.dumps(state).encode().ljust(4096), np.uint8)
  rows = multihost_utils.process_allgather(blob[None], tiled=True)
  return {str(i): json.loads(bytes(r).decode().strip()) for i, r in enumerate(np.asarray(rows))}
