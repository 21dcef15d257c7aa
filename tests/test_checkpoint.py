import glob
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from entropy_rl import checkpoint, sharding


def _state(scale=1.0, width=4):
  params = {
      "layer": {"w": scale * jnp.arange(8.0 * width).reshape(8, width)},
      "emb": jnp.full((4, 2), scale),
  }
  return {"params": params, "opt": optax.adamw(1e-3).init(params), "step": jnp.int32(scale)}


def _abstract(state, mesh):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=NamedSharding(mesh, P(*(("fsdp",) if x.ndim else ())))
      ),
      state,
  )


def _assert_tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_roundtrip_sharded_keep_last_and_metadata(tmp_path):
  mesh = sharding.make_mesh(data=2, fsdp=4)
  shard = NamedSharding(mesh, P("data", "fsdp"))
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2)
  assert ckpt.latest_step() is None
  for step in (1, 2, 3):
    state = _state(step)
    state["params"]["layer"]["w"] = jax.device_put(state["params"]["layer"]["w"], shard)
    meta = {
        "data": {"cursor": step * 10},
        "rng": np.array([1, 2], np.uint32),
        "lr": np.float32(0.5),
        "config": {"model": "tiny"},
    }
    assert ckpt.save(step, state, meta)
  assert not ckpt.save(3, _state(9), {})  # Already saved: skipped.
  ckpt.close()

  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2)
  assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
  # Restore onto a different sharding (fsdp only, 8-way), from ShapeDtypeStructs.
  state, meta = ckpt.restore(abstract_state=_abstract(_state(), mesh))
  _assert_tree_equal(state, _state(3))
  assert isinstance(state["opt"][0], optax.ScaleByAdamState)
  assert state["params"]["layer"]["w"].sharding.spec == P("fsdp")
  assert meta == {
      "data": {"cursor": 30},
      "rng": [1, 2],
      "lr": 0.5,
      "config": {"model": "tiny"},
      "step": 3,
  }
  # Explicit step; abstract state given as arrays (their shardings are used).
  state, meta = ckpt.restore(step=2, abstract_state=_state(0))
  _assert_tree_equal(state, _state(2))
  assert meta["step"] == 2
  with pytest.raises(FileNotFoundError, match="step 1"):
    ckpt.restore(step=1, abstract_state=_state())
  ckpt.close()


# Orbax leaves the failed read's sibling tasks unretrieved; harmless noise.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["array_files", "json", "state_dir", "state_metadata"])
def test_damaged_latest_falls_back_with_warning(tmp_path, caplog, damage):
  d = str(tmp_path / "ckpt")
  with checkpoint.Checkpointer(d) as ckpt:
    ckpt.save(1, _state(1), {"cursor": 1})
    ckpt.save(2, _state(2), {"cursor": 2})
  if damage == "array_files":
    for f in glob.glob(f"{d}/2/state/**/d/*", recursive=True):
      with open(f, "wb") as fh:
        fh.write(b"garbage")
  elif damage == "json":
    os.remove(f"{d}/2/metadata/metadata")
  elif damage == "state_metadata":
    os.remove(f"{d}/2/state/_METADATA")
  else:
    for f in glob.glob(f"{d}/2/state/**/manifest.ocdbt", recursive=True):
      os.remove(f)
  with checkpoint.Checkpointer(d) as ckpt, caplog.at_level(logging.WARNING):
    state, meta = ckpt.restore(abstract_state=_state())
  _assert_tree_equal(state, _state(1))
  assert meta == {"cursor": 1, "step": 1}
  assert any(
      "checkpoint 2" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records
  )


def test_all_damaged_or_empty_raises(tmp_path):
  d = str(tmp_path / "ckpt")
  with checkpoint.Checkpointer(d) as ckpt:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
      ckpt.restore(abstract_state=_state())
    ckpt.save(1, _state(1))
  os.remove(f"{d}/1/metadata/metadata")
  with checkpoint.Checkpointer(d) as ckpt:
    with pytest.raises(FileNotFoundError, match="(?s)no intact checkpoint.*step 1"):
      ckpt.restore(abstract_state=_state())


def test_unfinished_save_is_ignored_and_previous_kept(tmp_path):
  d = tmp_path / "ckpt"
  with checkpoint.Checkpointer(str(d)) as ckpt:
    ckpt.save(1, _state(1))
  # What a process killed mid-save leaves: orbax's temporary directory, never renamed.
  tmp = d / "2.orbax-checkpoint-tmp-1700000000000000"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "partial").write_bytes(b"x")
  with checkpoint.Checkpointer(str(d)) as ckpt:
    assert ckpt.all_steps() == [1]
    state, _ = ckpt.restore(abstract_state=_state())
    _assert_tree_equal(state, _state(1))
  assert not tmp.exists()


def test_shape_mismatch_names_parameter_and_shapes(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path / "ckpt")) as ckpt:
    ckpt.save(1, _state(1, width=6))
    ckpt.save(2, _state(2, width=4))
    # The newest checkpoint is intact but of another shape: an error, not a fallback to step 1.
    with pytest.raises(
        checkpoint.CheckpointShapeError, match=r"'opt/0/mu/layer/w'.*\(8, 4\).*\(8, 6\)"
    ):
      ckpt.restore(abstract_state=_state(width=6))
    extra = _state()
    extra["params"]["bias"] = jnp.zeros(3)
    with pytest.raises(
        checkpoint.CheckpointShapeError, match=r"no entry 'params/bias' \(shape \(3,\)\)"
    ):
      ckpt.restore(abstract_state=extra)
    fewer = _state()
    del fewer["step"]
    with pytest.raises(checkpoint.CheckpointShapeError, match="lacks.*'step'"):
      ckpt.restore(abstract_state=fewer)


def test_bad_metadata(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path / "ckpt")) as ckpt:
    with pytest.raises(ValueError, match=r"metadata\['fn'\] is not JSON"):
      ckpt.save(1, _state(), {"fn": print})
    with pytest.raises(ValueError, match=r"metadata\['step'\]=5 differs from step=1"):
      ckpt.save(1, _state(), {"step": 5})
    with pytest.raises(ValueError, match="max_to_keep"):
      checkpoint.Checkpointer(str(tmp_path / "x"), max_to_keep=0)


def test_relative_directory_saves_and_restores(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with checkpoint.Checkpointer("runs/x/checkpoints") as ckpt:
    assert ckpt.directory == str(tmp_path / "runs/x/checkpoints")
    ckpt.save(1, _state(1), {"cursor": 1})
  with checkpoint.Checkpointer("runs/x/checkpoints") as ckpt:
    state, meta = ckpt.restore(abstract_state=_state())
  _assert_tree_equal(state, _state(1))
  assert meta["cursor"] == 1


def test_background_save_failure_is_reported_once_by_check(tmp_path, monkeypatch):
  from orbax.checkpoint._src.path import atomicity

  async def disk_full(self, *args, **kwargs):
    raise OSError(28, "No space left on device")

  d = str(tmp_path / "ckpt")
  ckpt = checkpoint.Checkpointer(d)
  ckpt.save(1, _state(1))
  ckpt.wait_until_finished()
  with monkeypatch.context() as m:
    m.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", disk_full)
    ckpt.save(2, _state(2))
    with pytest.raises(
        checkpoint.CheckpointSaveError,
        match="checkpoint 2 .*No space left.*last complete checkpoint is step 1",
    ):
      for _ in range(200):  # the failure is reported as soon as the background save has ended
        ckpt.check()
        import time

        time.sleep(0.05)
    ckpt.check()  # reported once
  ckpt.close()
  with checkpoint.Checkpointer(d) as again:
    assert again.restore(abstract_state=_state())[1]["step"] == 1


def test_damaged_restore_is_one_warning_not_pages_of_noise(tmp_path, capfd):
  d = str(tmp_path / "ckpt")
  big = {f"w{i}": jnp.full((32, 32), float(i)) for i in range(40)}
  with checkpoint.Checkpointer(d) as ckpt:
    ckpt.save(1, big)
    ckpt.save(2, big)
  for f in glob.glob(f"{d}/2/state/**/d/*", recursive=True):
    with open(f, "wb") as fh:
      fh.write(b"garbage")
  capfd.readouterr()
  with checkpoint.Checkpointer(d) as ckpt:
    assert ckpt.restore(abstract_state=big)[1]["step"] == 1
  import gc
  import time

  gc.collect()
  time.sleep(0.5)  # abandoned reads finish late
  err = capfd.readouterr().err
  assert "never retrieved" not in err and "Event loop is closed" not in err
  assert len([l for l in err.splitlines() if "Traceback" in l]) == 0
