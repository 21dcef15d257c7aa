"""One process of tests/test_multihost.py's fast check: `python -m tests.multihost_worker WORKDIR`
with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES=2, JAX_PROCESS_ID and 4 CPU devices per process.

Checks, without compiling a model, what the trainer relies on across hosts: each host's block of
the prompt stream lands at its rows of the global batch, metrics and data positions are gathered
from every host, files cached in the shared workdir are written by process 0 only, and a
checkpoint of arrays sharded over both processes saves and restores. Exits non-zero on a failure.
"""

import os
import sys

import jax

jax.config.update("jax_threefry_partitionable", True)

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from entropy_rl import checkpoint, distributed, policy, sharding  # noqa: E402
from entropy_rl import data as data_lib  # noqa: E402
from entropy_rl.data import tasks  # noqa: E402

B = 8  # global prompts per step


def main(workdir: str) -> None:
  pid, count = distributed.maybe_initialize("on")
  assert (count, jax.device_count(), jax.local_device_count()) == (2, 8, 4)
  mesh = sharding.make_mesh(-1, 1, 1)
  batch = sharding.batch_sharding(mesh)
  shard = distributed.process_shard(B, batch)
  assert shard == (pid, 2), shard

  # Written once by process 0, then read by process 1.
  calls = []
  tokenizer = policy.process_zero_first(
      "tokenizer",
      lambda: calls.append(pid) or data_lib.build_tokenizer(os.path.join(workdir, "tok")),
  )
  assert calls == [pid] and len(tokenizer) > 3

  # Two steps of prompts: the global batch is the single-process stream in order.
  task = tasks.get_task("arithmetic")
  source = data_lib.make_source(
      _task_cfg(), seed=0, task=task, shard_index=shard[0], num_shards=shard[1]
  )
  whole = data_lib.make_source(_task_cfg(), seed=0, task=task).next_batch(2 * B)
  for step in range(2):
    local = data_lib.encode_prompts(tokenizer, [e.prompt for e in source.next_batch(B // 2)], 32)[0]
    global_BxP = distributed.to_global(local, mesh)
    np.testing.assert_array_equal(distributed.to_local(global_BxP), local)
    got = multihost_utils.process_allgather(global_BxP, tiled=True)
    want = data_lib.encode_prompts(
        tokenizer, [e.prompt for e in whole[step * B : (step + 1) * B]], 32
    )[0]
    np.testing.assert_array_equal(np.asarray(got), want)
  np.testing.assert_array_equal(distributed.gather(np.array([pid, 10 + pid])), [0, 10, 1, 11])
  states = distributed.gather_states(source.get_state())
  assert sorted(states) == ["0", "1"] and states["0"] == states["1"], states
  assert states["0"]["consumed"] == 2 * B

  # A checkpoint of arrays sharded over both processes, in the shared workdir.
  x = distributed.to_global(
      np.arange(pid * 16, pid * 16 + 16, dtype=np.float32).reshape(4, 4), mesh
  )
  state = {"x": x, "step": np.int32(2)}
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  ckpt.save(2, state, {"data": states})
  ckpt.wait_until_finished()
  restored, meta = ckpt.restore(abstract_state=state)
  ckpt.close()
  assert meta["data"] == states and meta["step"] == 2
  assert restored["x"].sharding == x.sharding
  np.testing.assert_array_equal(distributed.to_local(restored["x"]), distributed.to_local(x))
  multihost_utils.sync_global_devices("done")
  print(f"process {pid}: ok", flush=True)


def _task_cfg():
  import ml_collections

  return ml_collections.ConfigDict({"source": "synthetic", "name": "arithmetic", "split": "train"})


if __name__ == "__main__":
  main(sys.argv[1])
