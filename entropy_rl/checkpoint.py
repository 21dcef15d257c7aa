"""Checkpoints: an orbax `CheckpointManager` holding a state pytree and a JSON metadata dict.

Each step directory holds two items: `state` (arrays, sharded or not, written by every process
to a shared path) and `metadata` (JSON: data position, config, PRNG key data, ...; written by
process 0). Orbax writes into a temporary directory and renames it when complete, so a process
killed mid-save leaves the previous checkpoint intact (leftover temporaries are removed on the
next start). `restore()` falls back to the previous step, with one warning naming what was
wrong, when the latest is damaged (a missing or unreadable file, `state/_METADATA` included),
and refuses with one message when the saved shapes differ from the requested ones. A save that
fails in the background is reported by `check()` as one `CheckpointSaveError` naming the step.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from entropy_rl import fileio

log = logging.getLogger(__name__)


class CheckpointShapeError(ValueError):
  """The checkpoint's arrays do not have the shapes of the state being restored."""


class CheckpointSaveError(RuntimeError):
  """A checkpoint write failed (in the background or not); earlier checkpoints are untouched."""


def _drop_closed_loop_errors(hook):
  """Tensorstore reads that a failed restore abandoned finish later and report, as "unraisable",
  that orbax's event loop is closed (dozens of tracebacks per damaged checkpoint, at random
  times): drop exactly those; everything else goes to the previous hook."""

  def unraisablehook(unraisable):
    exc = unraisable.exc_value
    if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
      hook(unraisable)

  unraisablehook.entropy_rl = True
  return unraisablehook


if not getattr(sys.unraisablehook, "entropy_rl", False):
  sys.unraisablehook = _drop_closed_loop_errors(sys.unraisablehook)


@contextlib.contextmanager
def _quiet_asyncio():
  """Orbax's failed reads leave futures whose errors asyncio logs one by one at garbage collection
  ("exception was never retrieved", ~1,400 lines for one damaged checkpoint); the error that
  matters is raised and reported once by the caller."""
  logger = logging.getLogger("asyncio")
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    gc.collect()  # collect the abandoned futures while their warnings are still muted
    logger.setLevel(level)


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _path_name(path) -> str:
  return "/".join(_key_name(k) for k in path) or "<root>"


def _flat_shapes(tree) -> dict[str, tuple[int, ...]]:
  """'a/b/0/c' -> shape. Keys ignore container types (a NamedTuple field and a dict key match)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_name(p): tuple(getattr(x, "shape", np.shape(x))) for p, x in leaves}


def check_shapes(saved_tree, abstract_state) -> None:
  """Raises CheckpointShapeError naming the first parameter whose shape or presence differs."""
  saved, wanted = _flat_shapes(saved_tree), _flat_shapes(abstract_state)
  for name, shape in wanted.items():
    if name not in saved:
      raise CheckpointShapeError(
          f"checkpoint has no entry {name!r} (shape {shape}) of the state being restored: the "
          "checkpoint was written by a different model or optimizer configuration"
      )
    if saved[name] != shape:
      raise CheckpointShapeError(
          f"checkpoint shape mismatch for {name!r}: checkpoint has {saved[name]}, the current "
          f"config expects {shape}; resuming with another model shape is not possible"
      )
  extra = sorted(set(saved) - set(wanted))
  if extra:
    raise CheckpointShapeError(
        f"checkpoint has entries the state being restored lacks, e.g. {extra[0]!r} (shape "
        f"{saved[extra[0]]}): it was written by a different model or optimizer configuration"
    )


def _json_default(x):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, (np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  raise TypeError(f"{type(x).__name__} is not JSON-serialisable")


def _to_json(metadata: dict) -> dict:
  out = {}
  for k, v in metadata.items():
    try:
      out[k] = json.loads(json.dumps(v, default=_json_default))
    except (TypeError, ValueError) as e:
      raise ValueError(f"checkpoint metadata[{k!r}] is not JSON-serialisable: {e}") from None
  return out


def _abstract(x, default_sharding):
  """ShapeDtypeStruct with a sharding for one leaf of the requested state."""
  sharding = getattr(x, "sharding", None)
  if sharding is None:
    sharding = default_sharding
  return jax.ShapeDtypeStruct(
      np.shape(x), x.dtype if hasattr(x, "dtype") else np.result_type(x), sharding=sharding
  )


class _OneLineOrbaxErrors(logging.Filter):
  """Orbax logs a failed background save with full tracebacks (and asyncio's "Event loop is
  closed" on top); the failure reaches the caller as one CheckpointSaveError, so keep one line."""

  def filter(self, record):
    if "/orbax/" in record.pathname and record.exc_info:
      record.exc_info, record.exc_text = None, None
    return True


logging.getLogger("absl").addFilter(_OneLineOrbaxErrors())


class Checkpointer:
  """Keeps the last `max_to_keep` checkpoints of (state pytree, JSON metadata) under `directory`.

  `directory` may be local or `gs://...`; every process must call `save`/`restore` with the same
  arguments (arrays are written shard by shard by the processes that hold them).
  """

  def __init__(self, directory, *, max_to_keep: int = 3, async_save: bool = True):
    if not isinstance(max_to_keep, int) or max_to_keep < 1:
      raise ValueError(f"max_to_keep must be a positive integer, got {max_to_keep!r}")
    self.directory = fileio.resolve(directory)  # orbax needs an absolute path
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, cleanup_tmp_directories=True, enable_async_checkpointing=async_save
    )
    self._saving = None  # the step of the last save started
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=options,
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "metadata": ocp.JsonCheckpointHandler(),
        },
    )

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state, metadata: dict[str, Any] | None = None) -> bool:
    """Starts saving `state` and `metadata` (plus 'step') as checkpoint `step`.

    Returns False, saving nothing, if that step is already saved (e.g. a SIGTERM checkpoint right
    after a periodic one). The write continues in the background; `wait_until_finished()` or
    `close()` blocks until it is on disk.
    """
    step = int(step)
    metadata = dict(metadata or {})
    if metadata.setdefault("step", step) != step:
      raise ValueError(f"checkpoint metadata['step']={metadata['step']!r} differs from step={step}")
    metadata = _to_json(metadata)
    if step in self._mngr.all_steps():
      return False
    self._finish()  # orbax would wait for the previous save anyway; its failure is its own
    self._saving = step
    try:
      return self._mngr.save(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata)
          ),
      )
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointSaveError(self._save_failure(step, e)) from e

  def _save_failure(self, step, e) -> str:
    intact = [s for s in self._mngr.all_steps() if s != step]
    kept = f"the last complete checkpoint is step {max(intact)}" if intact else "none is complete"
    return (
        f"saving checkpoint {step} in {self.directory} failed ({type(e).__name__}: "
        f"{str(e)[:300]}); {kept}"
    )

  def check(self) -> None:
    """Raises CheckpointSaveError if the last background save has ended in a failure.

    Cheap (no waiting while a save is in progress): call it after every step so that a failed
    write (a full disk, a lost bucket) stops the run when it happens, not at the next save.
    """
    if self._saving is not None and not self._mngr.is_saving_in_progress():
      self._finish()

  def _finish(self) -> None:
    if self._saving is None:
      return
    step, self._saving = self._saving, None
    try:
      self._mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointSaveError(self._save_failure(step, e)) from None

  def _restore_step(self, step: int, abstract_state):
    if abstract_state is not None:
      saved = self._mngr.item_metadata(step)["state"]
      saved = getattr(saved, "tree", saved)
      if not jax.tree.leaves(saved) and jax.tree.leaves(abstract_state):
        raise FileNotFoundError(
            f"checkpoint {step} has no readable state/_METADATA (the array "
            "metadata of an incomplete or damaged write)"
        )
      check_shapes(saved, abstract_state)
    restored = self._mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), metadata=ocp.args.JsonRestore()
        ),
    )
    if restored["metadata"] is None:
      raise FileNotFoundError(f"checkpoint {step} has no metadata")
    return restored["state"], dict(restored["metadata"])

  def restore(self, step: int | None = None, abstract_state=None):
    """Restores (state, metadata) of `step`, or of the newest checkpoint that is intact.

    `abstract_state`: pytree of `jax.ShapeDtypeStruct`s with target shardings (or arrays, whose
    shardings are used); leaves without a sharding are replicated. Arrays are resharded to it.
    With `step=None`, a damaged newest checkpoint is skipped with a warning. Raises
    `CheckpointShapeError` if the saved shapes differ, FileNotFoundError if nothing is restorable.
    """
    self.wait_until_finished()
    if abstract_state is not None:
      mesh = jax.make_mesh(
          (jax.device_count(),), ("all",), axis_types=(jax.sharding.AxisType.Auto,)
      )
      replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      abstract_state = jax.tree.map(lambda x: _abstract(x, replicated), abstract_state)
    if step is not None:
      if int(step) not in self._mngr.all_steps():
        raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}")
      return self._restore_step(int(step), abstract_state)
    steps = sorted(self._mngr.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    errors = []
    for s in steps:
      try:
        with _quiet_asyncio():
          return self._restore_step(s, abstract_state)
      except CheckpointShapeError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        errors.append(f"step {s}: {type(e).__name__}: {str(e)[:300]}")
        log.warning(
            "checkpoint %d in %s is damaged (%s: %s); trying the previous one",
            s,
            self.directory,
            type(e).__name__,
            str(e).splitlines()[0][:300],
        )
    raise FileNotFoundError(f"no intact checkpoint in {self.directory}:\n" + "\n".join(errors))

  def wait_until_finished(self) -> None:
    """Blocks until the pending save is on disk; CheckpointSaveError if it failed."""
    self._finish()

  def close(self) -> None:
    """Waits for pending saves, then releases the manager (CheckpointSaveError if one failed)."""
    try:
      self._finish()
    finally:
      self._mngr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
