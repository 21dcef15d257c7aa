"""Metrics: one JSON line per step (workdir/metrics.jsonl), TensorBoard events (workdir/tb), a
progress bar, and end-of-run plots and a markdown summary table. Only process 0 writes.
"""

from __future__ import annotations

import io
import json
import logging
import math
import numbers
import os
import tempfile
import time
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from entropy_rl import fileio

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
SUMMARY_KEYS = (
    "reward/mean",
    "acc",
    "entropy/token_mean",
    "entropy/seq_mean",
    "cov/mean",
    "pg/clipfrac_high",
    "response/len_mean",
    "eval/pass@1",
)


def _scalar(key: str, v):
  """Python float/int/bool/str of a metric value; ValueError naming the key otherwise."""
  if isinstance(v, (str, bool)):
    return v
  if isinstance(v, numbers.Integral):
    return int(v)
  if isinstance(v, numbers.Real):
    return float(v)
  if hasattr(v, "shape") and np.size(v) == 1 and np.ndim(v) == 0:
    a = np.asarray(v)
    return a.item() if a.dtype.kind in "biu" else float(a)
  raise ValueError(
      f"metric {key!r} must be a scalar, got {type(v).__name__} "
      f"with shape {getattr(v, 'shape', None)}"
  )


def read_metrics(path) -> list[dict]:
  """Records of a metrics.jsonl file (local or URI); a line cut off by a kill is skipped."""
  records = []
  for i, line in enumerate(fileio.read_text(path).splitlines()):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      log.warning("%s line %d is not JSON (cut-off write?); skipped", path, i + 1)
  return records


class MetricsWriter:
  """Appends `{"step": step, **metrics}` lines to workdir/metrics.jsonl and TensorBoard scalars.

  `first_step`: the first step this run will write. Lines from that step on (written by an
  earlier run after the checkpoint this one resumed from, or by a run restarted from scratch) are
  dropped and TensorBoard is told to discard its events from `first_step` on, so a rerun never
  duplicates steps. Disabled (a no-op) when `enabled=False` or on any process but 0. Non-finite
  values are written as NaN/Infinity (Python's json reads them back). A URI workdir (gs://...)
  is written through a local staging directory uploaded every `sync_secs` and on
  `flush()`/`close()`.
  """

  def __init__(
      self, workdir, enabled: bool = True, first_step: int | None = None, sync_secs: float = 60.0
  ):
    self.enabled = enabled and jax.process_index() == 0
    self._file = self._tb = self._remote = None
    self.path = self.local_dir = None
    self._sync_secs, self._last_sync = sync_secs, time.monotonic()
    if not self.enabled:
      return
    if fileio.is_uri(workdir):
      self._remote = str(workdir)
      self.local_dir = tempfile.mkdtemp(prefix="entropy_rl_metrics_")
      remote_file = fileio.join(self._remote, METRICS_FILE)
      if fileio.exists(remote_file):
        with open(os.path.join(self.local_dir, METRICS_FILE), "wb") as f:
          f.write(fileio.read_bytes(remote_file))
    else:
      self.local_dir = str(workdir)
      os.makedirs(self.local_dir, exist_ok=True)
    self.path = os.path.join(self.local_dir, METRICS_FILE)
    if first_step is not None and os.path.exists(self.path):
      kept = [r for r in read_metrics(self.path) if r.get("step", -1) < first_step]
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
      os.replace(tmp, self.path)
    self._file = open(self.path, "a")
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

    self._tb = SummaryWriter(
        os.path.join(self.local_dir, TB_DIR), purge_step=first_step, flush_secs=30
    )

  def write(self, step: int, metrics: Mapping) -> None:
    if not self.enabled:
      return
    step = int(step)
    record = {"step": step}
    record.update({k: _scalar(k, v) for k, v in metrics.items()})
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    for k, v in record.items():
      if k != "step" and not isinstance(v, str):
        self._tb.add_scalar(k, float(v), step)
    if self._remote is not None and time.monotonic() - self._last_sync > self._sync_secs:
      self.flush()

  def _upload(self) -> None:
    fileio.upload_dir(self.local_dir, self._remote)
    self._last_sync = time.monotonic()

  def flush(self) -> None:
    """Flushes the files (and uploads them, for a remote workdir)."""
    if not self.enabled:
      return
    self._file.flush()
    self._tb.flush()
    if self._remote is not None:
      self._upload()

  def close(self) -> None:
    if self.enabled and self._file is not None:
      self._tb.close()
      self._file.close()
      if self._remote is not None:
        self._upload()
      self._file = self._tb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class ProgressBar:
  """tqdm bar over RL steps showing live reward and entropy (process 0 only)."""

  def __init__(
      self,
      total: int,
      initial: int = 0,
      enabled: bool = True,
      keys: Mapping[str, str] | None = None,
  ):
    self.keys = dict(keys or {"reward": "reward/mean", "entropy": "entropy/token_mean"})
    self._bar = None
    if enabled and jax.process_index() == 0:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

      self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

  def update(self, step: int, metrics: Mapping) -> None:
    """Moves the bar to `step` (the number of completed steps) and shows the chosen metrics."""
    if self._bar is None:
      return
    shown = {name: f"{float(metrics[k]):.4g}" for name, k in self.keys.items() if k in metrics}
    self._bar.set_postfix(shown, refresh=False)
    self._bar.update(int(step) - self._bar.n)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None


def _series(records: Sequence[dict], key: str):
  pts = [
      (r["step"], r[key])
      for r in records
      if isinstance(r.get(key), numbers.Real) and not isinstance(r.get(key), bool)
  ]
  return np.array([p[0] for p in pts]), np.array([p[1] for p in pts], float)


def plot_metrics(metrics_jsonl_path, keys: Sequence[str], out_png) -> str:
  """One panel per key (value vs step) saved as a PNG; a key never logged gets an empty panel.

  Both paths may be local or URIs (gs://...).
  """
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  if not keys:
    raise ValueError("plot_metrics: keys must name at least one metric")
  records = read_metrics(metrics_jsonl_path)
  fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.4 * len(keys)), sharex=True, squeeze=False)
  for ax, key in zip(axes[:, 0], keys):
    steps, values = _series(records, key)
    if len(steps):
      ax.plot(steps, values, marker="." if len(steps) < 50 else None)
    else:
      ax.text(0.5, 0.5, "(no data)", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
  axes[-1, 0].set_xlabel("step")
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  fileio.write_bytes(out_png, buf.getvalue())
  plt.close(fig)
  return str(out_png)


def summary_table(records: Sequence[dict], keys: Sequence[str]) -> str:
  """Markdown table: per metric the first and last logged value, min, max and the count."""

  def fmt(x):
    return "nan" if not math.isfinite(x) else f"{x:.4g}"

  lines = ["| metric | first | last | min | max | n |", "|---|---|---|---|---|---|"]
  for key in keys:
    _, values = _series(records, key)
    if not len(values):
      lines.append(f"| {key} | - | - | - | - | 0 |")
      continue
    finite = values[np.isfinite(values)]
    lo, hi = (fmt(finite.min()), fmt(finite.max())) if len(finite) else ("nan", "nan")
    lines.append(
        f"| {key} | {fmt(values[0])} | {fmt(values[-1])} | {lo} | {hi} | " f"{len(values)} |"
    )
  return "\n".join(lines)


def write_summary(workdir: str) -> str:
  """End of run: `curves.png` (reward, accuracy and entropy vs step) and `summary.md` (the summary
  table, every eval/ metric included) in `workdir`; returns the table."""
  path = fileio.join(workdir, METRICS_FILE)
  plot_metrics(
      path, ["reward/mean", "acc", "entropy/token_mean"], fileio.join(workdir, "curves.png")
  )
  records = read_metrics(path)
  eval_keys = sorted({k for r in records for k in r if k.startswith("eval/")})
  table = summary_table(records, list(dict.fromkeys(SUMMARY_KEYS + tuple(eval_keys))))
  fileio.write_text(fileio.join(workdir, "summary.md"), table + "\n")
  return table
