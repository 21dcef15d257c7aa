"""Multi-host JAX: two local processes (4 CPU devices each, a localhost coordinator, gloo
collectives) give the same metrics and parameters as one process with 8 devices and the same global
batch, and resume from the checkpoints they wrote to a shared directory (slow); a fast check runs
tests/multihost_worker.py (prompt blocks, gathering, process-0 files, a sharded checkpoint)."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from entropy_rl import checkpoint, config_lib, distributed, metrics, sharding, trainer
from configs import default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOLATILE = ("time/", "throughput/")
# The tiny run of tests/test_trainer.py; 6 eval prompts leave the second host of the one eval
# chunk (8 prompts) two real prompts and two padding rows.
TINY = {
    "warm_start.enabled": False,
    "rollout.prompts_per_step": 8,
    "rollout.num_samples": 4,
    "rollout.max_new_tokens": 12,
    "rl.num_minibatches": 2,
    "model.hidden_size": 32,
    "model.intermediate_size": 64,
    "model.num_layers": 1,
    "model.num_heads": 2,
    "model.num_kv_heads": 1,
    "model.head_dim": 16,
    "optim.lr": 1e-3,
    "optim.warmup_steps": 0,
    "eval_every": 2,
    "eval.num_prompts": 6,
    "eval.num_samples": 2,
    "checkpoint_every": 100,
    "reward.overlong_buffer": 8,  # length-shaped rewards: non-zero advantages at random init
}


def _config(num_steps):
  c = default.get_config()
  for key, value in {**TINY, "num_steps": num_steps}.items():
    section, _, field = key.rpartition(".")
    (c[section] if section else c)[field] = value
  config_lib.validate(c, jax.device_count())
  return c


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _main_command(workdir, num_steps):
  flags = [f"--config.{k}={v}" for k, v in {**TINY, "num_steps": num_steps}.items()]
  return [
      sys.executable,
      "-m",
      "entropy_rl.main",
      "--config=configs/default.py",
      f"--workdir={workdir}",
      "--config.distributed=on",
      *flags,
  ]


def _run_two_processes(cmd, timeout=300):
  """`cmd` as processes 0 and 1 of a 2-process job on this machine; returns their outputs."""
  port = _free_port()
  procs = []
  for pid in range(2):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES="2",
        JAX_PROCESS_ID=str(pid),
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
    )
    procs.append(
        subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    )
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for pid, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {pid} failed:\n{out[-4000:]}"
  return outputs


def _records(workdir):
  return [
      {k: v for k, v in r.items() if not k.startswith(VOLATILE)}
      for r in metrics.read_metrics(os.path.join(workdir, metrics.METRICS_FILE))
  ]


def _state(workdir, step, like=None):
  """The checkpointed state on this process's first device (`like`: a state giving the target
  shapes, needed for a checkpoint written by another topology)."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = (
      None
      if like is None
      else jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), like)
  )
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  state, _ = ckpt.restore(step, abstract_state=abstract)
  ckpt.close()
  return state


def test_process_shard():
  batch = sharding.batch_sharding(sharding.make_mesh(data=2, fsdp=4))
  devices = [d for d, idx in batch.devices_indices_map((16,)).items() if idx[0].start >= 8]
  assert distributed.process_shard(16, batch, devices) == (1, 2)
  assert distributed.process_shard(16, batch) == (0, 1)


def test_two_processes_smoke(tmp_path):
  outputs = _run_two_processes(
      [sys.executable, "-m", "tests.multihost_worker", str(tmp_path)], timeout=120
  )
  assert [out.strip().splitlines()[-1] for out in outputs] == ["process 0: ok", "process 1: ok"]
  assert os.listdir(tmp_path / "checkpoints") == ["2"]


@pytest.mark.slow
def test_two_processes_equal_one_and_resume(tmp_path):
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  trainer.train(_config(num_steps=3), single)

  _run_two_processes(_main_command(multi, num_steps=2))
  assert checkpoint.Checkpointer(os.path.join(multi, "checkpoints")).all_steps() == [2]
  assert sorted(os.listdir(os.path.join(multi, "tokenizer"))) == sorted(
      os.listdir(os.path.join(single, "tokenizer"))
  )
  outputs = _run_two_processes(
      _main_command(multi, num_steps=3)
  )  # the same command again: both resume
  assert all("resumed from step 2" in out for out in outputs), outputs[1][-2000:]

  a, b = _records(single), _records(multi)
  assert [r["step"] for r in b] == [0, 1, 2, 3]  # step 0: the evaluation before training
  assert [sorted(r) for r in a] == [sorted(r) for r in b]
  assert all("eval/pass@1" in b[i] for i in (0, 2, 3))
  for ra, rb in zip(a, b):
    for k in ra:
      np.testing.assert_allclose(
          rb[k], ra[k], rtol=1e-5, atol=1e-6, err_msg=f"step {ra['step']} {k}"
      )
  want = _state(single, 3)
  got = _state(multi, 3, like=want)
  moved = jax.tree.leaves(
      jax.tree.map(
          lambda x, y: np.abs(np.asarray(x) - np.asarray(y)).max(),
          want["params"],
          _state(multi, 2, like=want)["params"],
      )
  )
  assert max(moved) > 1e-4  # step 3's update changed the parameters
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)
