"""A process pool with a hard per-item time limit.

Each item runs `fn(*args)` in a worker process started afresh (`python -c`, like multiprocessing's
spawn but without re-importing the caller's main script, so unguarded scripts and notebooks work
and no JAX threads are forked). An item that overruns `timeout_s` (counted
from when its worker received it) is abandoned: its worker is killed and replaced, the item gets
`default` and is reported as timed out. A worker that dies on an item is replaced the same way and
the item is reported as failed, as is an item whose `fn` raised. So a pathological input can cost
at most `timeout_s` of one worker, never a stalled step.
"""

from __future__ import annotations

import importlib
import json
import socket
import subprocess
import sys
import time
import weakref
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Sequence

import numpy as np

_STARTUP_TIMEOUT_S = 120.0


_CHILD = (
    "import sys, json; sys.path[:0] = json.loads(sys.argv[1]); "
    "from entropy_rl.rewards.pool import _child_main; _child_main()"
)


def _child_main():
  """Worker process entry: argv = [sys_path_json, fd, module, qualname]."""
  fn = importlib.import_module(sys.argv[3])
  for part in sys.argv[4].split("."):
    fn = getattr(fn, part)
  _worker_main(Connection(int(sys.argv[2])), fn)


def _worker_main(conn, fn):
  conn.send(("ready", None, None))
  while True:
    msg = conn.recv()
    if msg is None:
      return
    index, args = msg
    try:
      conn.send((index, True, fn(*args)))
    except Exception as e:  # pylint: disable=broad-except
      conn.send((index, False, f"{type(e).__name__}: {e}"))


class _Worker:

  def __init__(self, fn):
    parent, child = socket.socketpair()
    self.process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _CHILD,
            json.dumps(sys.path),
            str(child.fileno()),
            fn.__module__,
            fn.__qualname__,
        ],
        pass_fds=(child.fileno(),),
        stdin=subprocess.DEVNULL,
    )
    child.close()
    self.conn = Connection(parent.detach())
    self.ready = False
    self.item = None  # (index, deadline) while busy

  def kill(self):
    self.process.kill()
    self.process.wait()
    self.conn.close()


def _shutdown(workers):
  for w in workers:
    try:
      w.conn.send(None)
    except (OSError, ValueError):
      pass
  for w in workers:
    try:
      w.process.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
      w.process.kill()
      w.process.wait()
    w.conn.close()


class TimeoutPool:
  """`map(items)` runs `fn(*item)` for each item in `num_workers` spawned processes, each item
  limited to `timeout_s` seconds. `fn` must be a module-level function of an importable module."""

  def __init__(
      self, fn: Callable[..., Any], *, num_workers: int, timeout_s: float, default: Any = 0.0
  ):
    if num_workers < 1:
      raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if timeout_s <= 0:
      raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if fn.__module__ == "__main__" or "<locals>" in fn.__qualname__:
      raise ValueError(f"fn must be a module-level function of an importable module, got {fn}")
    self.fn, self.timeout_s, self.default = fn, timeout_s, default
    self._workers = [_Worker(fn) for _ in range(num_workers)]
    self.errors: list[str] = []  # the messages of the last `map`'s failed items
    self._finalizer = weakref.finalize(self, _shutdown, self._workers)

  def close(self):
    self._finalizer()

  def _replace(self, i):
    self._workers[i].kill()
    self._workers[i] = _Worker(self.fn)

  def map(self, items: Sequence[tuple]) -> tuple[list[Any], np.ndarray, np.ndarray]:
    """(results, timed_out bool[n], failed bool[n]); timed-out and failed items get `default`,
    and `self.errors` lists the failed items' error messages."""
    if not self._finalizer.alive:
      raise ValueError("TimeoutPool is closed")
    n = len(items)
    self.errors = []
    results = [self.default] * n
    timed_out, failed = np.zeros(n, bool), np.zeros(n, bool)
    todo = list(range(n - 1, -1, -1))
    startup_deadline = time.monotonic() + _STARTUP_TIMEOUT_S
    while todo or any(w.item for w in self._workers):
      for i, w in enumerate(list(self._workers)):
        if w.ready and w.item is None and todo:
          index = todo.pop()
          try:
            w.conn.send((index, items[index]))
          except OSError:  # the worker died while idle: retry the item on its replacement
            todo.append(index)
            self._replace(i)
            continue
          w.item = (index, time.monotonic() + self.timeout_s)
      now = time.monotonic()
      deadlines = [w.item[1] for w in self._workers if w.item]
      deadlines += [startup_deadline] if not any(w.ready for w in self._workers) else []
      ready = wait([w.conn for w in self._workers], timeout=max(0.0, min(deadlines) - now))
      for i, w in enumerate(list(self._workers)):
        if w.conn in ready:
          try:
            index, ok, value = w.conn.recv()
          except (EOFError, OSError):  # the worker died
            if w.item:
              failed[w.item[0]] = True
              self.errors.append("the worker process died")
            elif not w.ready:
              raise RuntimeError("a reward worker process died while starting") from None
            self._replace(i)
            continue
          if index == "ready":
            w.ready = True
            startup_deadline = time.monotonic() + _STARTUP_TIMEOUT_S
            continue
          results[index] = value if ok else self.default
          failed[index] = not ok
          if not ok:
            self.errors.append(value)
          w.item = None
      now = time.monotonic()
      for i, w in enumerate(list(self._workers)):
        if w.item and now >= w.item[1]:
          timed_out[w.item[0]] = True
          self._replace(i)
      if not any(w.ready for w in self._workers) and now >= startup_deadline:
        raise RuntimeError(f"no reward worker started within {_STARTUP_TIMEOUT_S:.0f} s")
    return results, timed_out, failed
