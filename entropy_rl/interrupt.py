"""Stopping a run early on SIGINT (Ctrl-C) or SIGTERM (a preemption notice, `launch_tpu.sh stop`).

`StopFlag` is installed when a run starts, before anything slow: a signal only records itself,
and the run stops at the next safe point (a warm-start step, a rollout draw, the end of an RL
step), checkpoints the last completed RL step and raises `Interrupted`. A second Ctrl-C stops at
once (KeyboardInterrupt). The CLI exits with 128 + the signal number (130 for SIGINT, 143 for
SIGTERM), as shells report a process killed by that signal, so a launcher can tell an early stop
from a finished run (exit 0).
"""

from __future__ import annotations

import signal


class Interrupted(Exception):
  """The run stopped early on a signal; `step` RL steps are checkpointed (None: none yet)."""

  def __init__(self, signum: int, step: int | None = None):
    self.signum, self.step = signum, step
    name = signal.Signals(signum).name
    where = (
        f"checkpointed step {step}; rerun the same command to resume"
        if step is not None
        else "nothing to checkpoint yet"
    )
    super().__init__(f"stopped by {name}: {where}")

  @property
  def exit_code(self) -> int:
    return 128 + self.signum


class StopFlag:
  """Records SIGINT / SIGTERM while installed (a context manager restoring the old handlers)."""

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self):
    self.signum: int | None = None
    self._previous = {}

  def _handler(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.signum == signal.SIGINT:
      raise KeyboardInterrupt  # the second Ctrl-C: stop now
    self.signum = signum

  def __enter__(self):
    self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
    return self

  def __exit__(self, *exc):
    for s, h in self._previous.items():
      signal.signal(s, h)

  @property
  def requested(self) -> bool:
    return self.signum is not None
