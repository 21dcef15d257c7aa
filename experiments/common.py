"""Shared runner for the studies: launch RL runs, read their metrics, probe checkpoints.

Runs are launched one at a time as subprocesses (`python -m experiments.common run ...`) into
`<root>/<name>`; a run whose metrics.jsonl already holds all its steps is reused, so studies share
runs (study 1 reads study 2's GRPO runs, study 5 reuses the defaults of studies 2 and 1).

Every run shares one warm start, `config.warm_start.path = <root>/_warm_start` (trained by the
first run; `warm_start.seed` is separate from the RL seed), so RL seeds differ while the starting
policy is the same. Studies run `configs/<family>.py:<preset>`, `--preset tiny` by default.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import functools
import gzip
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from experiments import machine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULT_ROOT = os.environ.get("ENTROPY_RL_RUNS", "/work/runs")
# Finished full runs' records (spec.json, summary.md, metrics.jsonl.gz; no checkpoints), committed
# so that a study spread over machines resumes and its report regenerates where the runs are gone.
ARCHIVE = os.path.join(REPO, "experiments", "runs")
ARCHIVED = ("spec.json", "summary.md", "metrics.jsonl")
WARM_DIR = "_warm_start"  # under --root, shared by every run there
# Study 2's run length: GRPO's plateau fell at steps 299-481. Studies 1, 3 and 5 reuse these runs.
STUDY2_STEPS = 500
QUICK = {"eval_every": 5, "eval.num_prompts": 32, "eval.num_samples": 8}
FULL = {"eval_every": 50, "eval.num_prompts": 64, "eval.num_samples": 16}


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One RL run: configs/<family>.py:<arg> with dotted overrides."""

  name: str
  family: str
  arg: str = "tiny"
  overrides: tuple = ()  # ((dotted key, value), ...)

  def config_overrides(self) -> dict:
    return dict(self.overrides)


# The task of the original studies, pinned so that all runs (and the shared warm start, whose cache
# is keyed on the task) stay comparable when the task's defaults change.
TASK_OPTIONS = {"num_numbers": 3, "max_number": 12, "max_target": 99, "ops": "+-*"}
# `--setting`: the synthetic task (and its warm start) the tiny preset's runs use, pinned in full.
# countdown: one expression per answer (the CPU results in experiments/README.md). steps: worked
# steps (`9*3=27;27-7=20`, tasks.CountdownSteps), where only the choice tokens fork (HE-like
# entropy) and a finite pool of ~13k problems is revisited; its warm start (1200 steps, 55% of the
# demonstrations corrupted) starts greedy accuracy low (0.21 on 1,024 validation prompts) while
# pass@16 at T = 1 is high (0.87).
SETTINGS = {
    "countdown": {},
    "steps": {
        "task.name": "countdown_steps",
        **{
            f"task.options.countdown_steps.{k}": v
            for k, v in {
                "num_numbers": 3,
                "max_number": 20,
                "max_target": 99,
                "max_result": 99,
                "ops": "+-*",
            }.items()
        },
        "warm_start.steps": 1200,
        "warm_start.corrupt_prob": 0.55,
    },
}


def load_config(family: str, arg: str, overrides: dict):
  """configs/<family>.py:<arg> with `TASK_OPTIONS` and dotted `overrides` (KeyError naming an
  override that is no field; values cast as `--config.a.b=v` casts them)."""
  c = importlib.import_module(f"configs.{family}").get_config(arg)
  if c.task.source == "synthetic" and c.task.name == "countdown":
    overrides = {**{f"task.options.countdown.{k}": v for k, v in TASK_OPTIONS.items()}, **overrides}
  c.lock()  # an unknown key raises instead of adding a field
  c.update_from_flattened_dict(overrides)
  c.unlock()
  return c


def run_tag(quick: bool, preset: str, setting: str = "countdown") -> str:
  """Run-name prefix: q (quick) or f (full), then the setting unless countdown and the preset unless
  tiny (`f_qwen2_5_7b_grpo_s0`, `f_steps_grpo_s0`)."""
  tag = "q" if quick else "f"
  if preset == "tiny" and setting != "countdown":
    tag += f"_{setting}"
  return tag + ("" if preset == "tiny" else f"_{preset}")


def arm_specs(
    arms: dict, settings: dict, seeds: int, tag: str, preset: str = "tiny", first_seed: int = 0
) -> dict:
  """{arm: [RunSpec per seed]} for `arms` {arm: (config family, preset variant, overrides)}: run
  configs/<family>.py:<preset>[,<variant>] with `settings`, the arm's overrides and each of the
  `seeds` seeds from `first_seed` on, named `<tag>_<arm>_s<seed>` ('%' spelled 'pct')."""
  out = {}
  for arm, (family, variant, extra) in arms.items():
    arg = f"{preset},{variant}" if variant else preset
    out[arm] = [
        RunSpec(
            f"{tag}_{arm.replace('%', 'pct')}_s{s}",
            family,
            arg,
            tuple(sorted({**settings, **extra, "seed": s}.items())),
        )
        for s in range(first_seed, first_seed + seeds)
    ]
  return out


def run_dir(root: str, s: RunSpec) -> str:
  return os.path.join(root, s.name)


def warm_dir(root: str, overrides: dict) -> str:
  """The warm start shared by the runs of one synthetic task: `<root>/_warm_start` (countdown) or
  `<root>/_warm_start_<task>`, so that settings never retrain each other's cache."""
  task = overrides.get("task.name", "countdown")
  return os.path.abspath(os.path.join(root, WARM_DIR + ("" if task == "countdown" else f"_{task}")))


def _complete(path: str, num_steps: int) -> bool:
  records = read_records(path)
  return (
      bool(records)
      and records[-1]["step"] >= num_steps
      and os.path.exists(os.path.join(path, "summary.md"))
  )


@contextlib.contextmanager
def _locked(path: str):
  """Holds `<path>.lock`, so two studies sharing a root never launch the same run at once (the
  second waits, then reuses it)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".lock", "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _spec_key(spec: dict) -> tuple:
  """What makes two runs the same run: the config and its overrides (not the code or warm start,
  which `same_code` and `same_warm_start` report)."""
  return (spec["name"], spec["family"], spec["arg"], json.dumps(spec["overrides"], sort_keys=True))


def archive_run(path: str, archive: str) -> str:
  """Copies run dir `path`'s records (`ARCHIVED`, metrics gzipped) to `<archive>/<name>`."""
  dest = os.path.join(archive, os.path.basename(os.path.normpath(path)))
  os.makedirs(dest, exist_ok=True)
  for name in ARCHIVED:
    src = os.path.join(path, name)
    if name.endswith(".jsonl"):
      with (
          open(src, "rb") as f,
          gzip.GzipFile(os.path.join(dest, name + ".gz"), "wb", mtime=0) as g,
      ):
        shutil.copyfileobj(f, g)
    else:
      shutil.copyfile(src, os.path.join(dest, name))
  return dest


def restore_run(root: str, s: RunSpec, archive: str) -> bool:
  """Restores `s`'s records from `<archive>/<name>` into `<root>/<name>` when archived there with
  the same config and overrides; False when not archived (a differing spec raises: rename one)."""
  src = os.path.join(archive, s.name)
  if not os.path.exists(os.path.join(src, "spec.json")):
    return False
  with open(os.path.join(src, "spec.json")) as f:
    spec = json.load(f)
  want = json.loads(json.dumps(dataclasses.asdict(s)))  # tuples as JSON lists, as archived
  if _spec_key(spec) != _spec_key(want):
    raise ValueError(f"{src}/spec.json archives another run under the name {s.name}")
  path = run_dir(root, s)
  os.makedirs(path, exist_ok=True)
  for name in ARCHIVED:
    if name.endswith(".jsonl"):
      with (
          gzip.open(os.path.join(src, name + ".gz"), "rb") as g,
          open(os.path.join(path, name), "wb") as f,
      ):
        shutil.copyfileobj(g, f)
    else:
      shutil.copyfile(os.path.join(src, name), os.path.join(path, name))
  return True


def warm_start_sha256(warm: str) -> str | None:
  """The shared warm start's fingerprint: sha256 of its weights (None before it is trained)."""
  from entropy_rl import warmstart

  files = sorted(
      os.path.join(d, f)
      for d, _, names in os.walk(os.path.join(warm, warmstart.MODEL_DIR))
      for f in names
      if f.endswith(".safetensors")
  )
  if not files:
    return None
  h = hashlib.sha256()
  for name in files:
    with open(name, "rb") as f:
      for chunk in iter(lambda f=f: f.read(1 << 20), b""):
        h.update(chunk)
  return h.hexdigest()


def ensure_run(
    root: str, s: RunSpec, log=print, archive: str | None = None, launch: bool = True
) -> str | None:
  """Runs `s` in `<root>/<name>` unless already complete there or archived in `archive` (restored
  from it); archives it there once finished. Returns the run dir; with `launch=False`, only a run
  already finished (None otherwise: a report of what exists)."""
  path = run_dir(root, s)
  # ENTROPY_RL_EXTRA_OVERRIDES (JSON) applies to every run: for smoke tests in a scratch --root.
  extra = json.loads(os.environ.get("ENTROPY_RL_EXTRA_OVERRIDES", "{}"))
  overrides = {**s.config_overrides(), **extra}
  overrides["warm_start.path"] = warm = warm_dir(root, overrides)
  num_steps = int(overrides.get("num_steps", load_config(s.family, s.arg, {}).num_steps))
  archive = None if extra else archive  # a smoke test's runs are not the spec's runs

  seed = overrides.get("seed")

  def finished() -> bool:
    if _complete(path, num_steps):
      log(f"[reuse] {s.name}")
      return True
    if archive and restore_run(root, s, archive) and _complete(path, num_steps):
      log(f"[archived] {s.name}")
      return True
    return False

  if not launch:
    return path if finished() else None
  with _locked(path):
    if not finished():
      if archive:
        restore_warm_start(warm, archive)
        check_warm_start(warm, archive, s.name, seed)  # before a run that would train another
      _launch(path, s, overrides, warm, log)
      if archive:
        check_warm_start(warm, archive, s.name, seed)  # the warm start this run trained
        archive_warm_start(warm, archive)
        archive_run(path, archive)
  return path


def archive_warm_start(warm: str, archive: str) -> None:
  """Copies warm start dir `warm` (weights and `warm_start.json`, ~2 MB at tiny size) to
  `<archive>/<its name>` unless one is there: its bits depend on the machine (XLA:CPU's reductions
  follow the CPU's vector units and thread count), so later runs on any machine restore it."""
  dest = os.path.join(archive, os.path.basename(os.path.normpath(warm)))
  if warm_start_sha256(warm) is not None and not os.path.isdir(dest):
    _copy_warm_start(warm, dest)


def restore_warm_start(warm: str, archive: str) -> None:
  """Copies the archived warm start of `warm`'s task into `warm` when `warm` has none."""
  src = os.path.join(archive, os.path.basename(os.path.normpath(warm)))
  if warm_start_sha256(warm) is None and warm_start_sha256(src) is not None:
    _copy_warm_start(src, warm)


def _copy_warm_start(src: str, dest: str) -> None:
  """Copies warm start dir `src` to `dest` whole or not at all; another study that got there first
  wins."""
  tmp = f"{dest}.tmp{os.getpid()}"
  shutil.copytree(src, tmp)
  try:
    os.replace(tmp, dest)
  except OSError:  # `dest` exists and is not empty
    shutil.rmtree(tmp)
    if warm_start_sha256(dest) is None:
      raise


def archived_warm_starts(archive: str, warm: str, seed=None) -> list:
  """The spec.json of every run in `archive` that started from warm start dir `warm`'s task (the
  same `warm_dir` name), records the warm start's sha256 and has seed `seed` (any if None)."""
  out = []
  for name in sorted(os.listdir(archive)) if os.path.isdir(archive) else []:
    try:
      with open(os.path.join(archive, name, "spec.json")) as f:
        spec = json.load(f)
    except (FileNotFoundError, NotADirectoryError):
      continue
    overrides = dict(map(tuple, spec.get("overrides", ())))
    task_warm = warm_dir("", overrides)
    if (
        spec.get("warm_start_sha256")
        and os.path.basename(task_warm) == os.path.basename(warm)
        and (seed is None or overrides.get("seed") == seed)
    ):
      out.append(spec)
  return out


def check_warm_start(warm: str, archive: str, name: str, seed=None) -> None:
  """Raises when `warm` exists and differs from the warm start of the runs archived for its task
  with seed `seed`: a run on it would not be paired with theirs (a study pairs seed i of every arm
  with GRPO's seed i). XLA:CPU's reductions depend on the CPU and the thread count, so a warm start
  retrained elsewhere differs in its last bits and its accuracy; `archive_warm_start` keeps one."""
  have = warm_start_sha256(warm)
  specs = archived_warm_starts(archive, warm, seed)
  want: dict = {}
  for spec in specs:
    want.setdefault(spec["warm_start_sha256"], []).append(spec["name"])
  if have is None or not want or have in want:
    return
  runs = "; ".join(
      f"{sha[:12]}: {', '.join(n[:3])}{' ...' if len(n) > 3 else ''}" for sha, n in want.items()
  )
  cpus = sorted({spec["cpus"] for spec in specs if "cpus" in spec})
  raise RuntimeError(
      f"run {name}: the warm start {warm} (sha256 {have[:12]}) is not the one the "
      f"{'' if seed is None else f'seed-{seed} '}runs archived in {archive} started from ({runs}); "
      "retrain it as they did"
      + (f" (launched on {cpus} CPUs, e.g. `taskset -c 0`)" if cpus else "")
      + " in an empty --root, or archive this study elsewhere (--archive)"
  )


def _launch(path: str, s: RunSpec, overrides: dict, warm: str, log) -> None:
  os.makedirs(path, exist_ok=True)
  spec_file = os.path.join(path, "spec.json")
  old = {}  # a run resumed (or extended) here keeps the code and the machine of every launch
  if os.path.exists(spec_file):
    with open(spec_file) as f:
      old = json.load(f)
  spec = {
      **dataclasses.asdict(s),
      "code": code_version(),
      "earlier_code": old.get("earlier_code", []) + ([old["code"]] if "code" in old else []),
      "machine": machine.cpu_kind(),  # XLA:CPU compiles for its vector units: the bits depend on it
      "earlier_machine": old.get("earlier_machine", [])
      + ([old.get("machine", "unrecorded")] if old else []),
      "cpus": len(os.sched_getaffinity(0)),  # XLA:CPU's reductions, so its bits, depend on it
  }
  with open(spec_file, "w") as f:
    json.dump(spec, f, indent=1)
  cmd = [
      sys.executable,
      "-m",
      "experiments.common",
      "run",
      "--family",
      s.family,
      "--arg",
      s.arg,
      "--workdir",
      path,
      "--overrides",
      json.dumps(overrides),
  ]
  start = time.time()
  log(f"[run] {s.name}: {s.family}:{s.arg} {s.config_overrides()}")
  with open(os.path.join(path, "log.txt"), "a") as out:
    rc = subprocess.call(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
  if rc:
    raise RuntimeError(f"run {s.name} failed (rc {rc}); see {path}/log.txt")
  spec["warm_start_sha256"] = warm_start_sha256(warm)
  with open(spec_file, "w") as f:
    json.dump(spec, f, indent=1)
  log(f"[done] {s.name} in {time.time() - start:.0f} s")


CODE_DIRS = ("entropy_rl", "configs")  # what a run executes; experiments/ only launches and reads


def _git(*args) -> str | None:
  out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
  return out.stdout.strip() if out.returncode == 0 else None


def code_version() -> dict:
  """The commit a run is launched from and whether `CODE_DIRS` had uncommitted changes, so every arm
  of a comparison can be checked to come from the same code (`same_code`)."""
  dirty = _git("status", "--porcelain", "--untracked-files=no", "--", *CODE_DIRS)
  return {"commit": _git("rev-parse", "HEAD"), "dirty": bool(dirty) if dirty is not None else None}


def code_of(commit: str | None) -> str:
  """The code a commit runs, named by the last commit at or before it that changed `CODE_DIRS`
  (commits since changed only experiments/ or prose); the commit itself when git cannot say."""
  if not commit:
    return str(commit)
  return _git("log", "--format=%H", "-1", commit, "--", *CODE_DIRS) or commit


def _spec(root: str, s: RunSpec) -> dict:
  """The spec.json `_launch` wrote for `s` in `root`; {} before its first launch."""
  try:
    with open(os.path.join(run_dir(root, s), "spec.json")) as f:
      return json.load(f)
  except FileNotFoundError:
    return {}


def same_code(root: str, specs) -> dict:
  """{code: [run names]} of the runs of `specs` in `root`, the code named by `code_of`, every launch
  of a resumed run counted (one key: all ran the same `entropy_rl/` and `configs/`)."""
  out: dict = {}
  for s in specs:
    spec = _spec(root, s)
    launches = spec.get("earlier_code", []) + [spec.get("code", {})]
    names = [code_of(c.get("commit")) + ("+dirty" if c.get("dirty") else "") for c in launches]
    key = " then ".join(dict.fromkeys(names))  # a run resumed on other code shows each
    out.setdefault(key, []).append(s.name)
  return out


def same_machine(root: str, specs) -> dict:
  """{CPU: [run names]} of the runs of `specs` in `root`, every launch of a resumed run counted
  ('unrecorded' for runs launched before specs named the machine)."""
  out: dict = {}
  for s in specs:
    spec = _spec(root, s)
    launches = spec.get("earlier_machine", []) + [spec.get("machine", "unrecorded")]
    out.setdefault(" then ".join(dict.fromkeys(launches)), []).append(s.name)
  return out


def same_warm_start(root: str, specs) -> dict:
  """{warm start sha256 (first 12 digits): [run names]} of the runs of `specs` in `root` (one key:
  every run started from the same weights)."""
  out: dict = {}
  for s in specs:
    out.setdefault(str(_spec(root, s).get("warm_start_sha256"))[:12], []).append(s.name)
  return out


def read_records(path: str) -> list[dict]:
  f = os.path.join(path, "metrics.jsonl")
  if not os.path.exists(f):
    return []
  from entropy_rl import metrics

  return metrics.read_metrics(f)


def truncate(records, num_steps: int) -> list[dict]:
  """The first `num_steps` steps of a run. With the constant LR schedule a longer run's first steps
  equal a shorter run's (evaluation draws its own keys), so studies compare against study 2's runs.
  """
  return [r for r in records if r["step"] <= num_steps]


def series(records, key):
  """(steps, values) of the records that have `key`."""
  pts = [(r["step"], r[key]) for r in records if key in r]
  if not pts:
    return np.zeros(0), np.zeros(0)
  s, v = zip(*pts)
  return np.asarray(s, np.float64), np.asarray(v, np.float64)


def final_mean(records, key, last: int = 10) -> float:
  _, v = series(records, key)
  return float(np.mean(v[-last:])) if len(v) else float("nan")


def last_value(records, key) -> float:
  _, v = series(records, key)
  return float(v[-1]) if len(v) else float("nan")


def mean_std(values) -> str:
  v = np.asarray([x for x in values if np.isfinite(x)], np.float64)
  if not len(v):
    return "n/a"
  if len(v) == 1:
    return f"{v[0]:.3f}"
  return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"


def md_table(header, rows) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows:
    lines.append("| " + " | ".join(x if isinstance(x, str) else f"{x:.4g}" for x in r) + " |")
  return "\n".join(lines)


def setting_overrides(setting: str, preset: str) -> dict:
  """`SETTINGS[setting]` for the tiny preset, whose task is synthetic; nothing for a paper preset."""
  return dict(SETTINGS[setting]) if preset == "tiny" else {}


def run_settings(
    quick: bool, steps: int, quick_steps: int = 10, setting: str = "countdown", preset: str = "tiny"
) -> dict:
  """Overrides shared by the studies' runs (same settings -> same run dir -> reused); `setting`
  (`SETTINGS`) applies to the tiny preset, whose task is synthetic."""
  out = dict(QUICK if quick else FULL)
  out.update(setting_overrides(setting, preset))
  out["num_steps"] = n = quick_steps if quick else steps
  out["checkpoint_every"] = max(n // 4, 1)
  out["keep_checkpoints"] = 5
  return out


# ----------------------------------------------------------------------------- reports


def line_colors(n: int) -> list:
  """`n` colours for `n` lines: matplotlib's default cycle (tab10) up to 10 lines, tab20 up to 20
  (past 20 they repeat), so no two of a study's arms share a colour."""
  import matplotlib

  colors = matplotlib.colormaps["tab10" if n <= 10 else "tab20"].colors
  return [colors[i % len(colors)] for i in range(n)]


def plot_groups(groups: dict, keys, out_png: str, smooth: int = 5, title: str = "") -> str:
  """One panel per metric key; one line per label (mean over its runs, band = min..max)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from entropy_rl import analysis

  fig, axes = plt.subplots(1, len(keys), figsize=(3.3 * len(keys), 2.8), squeeze=False)
  colors = line_colors(len(groups))
  for ax, key in zip(axes[0], keys):
    for i, (label, runs) in enumerate(groups.items()):
      curves = [series(r, key) for r in runs]
      curves = [c for c in curves if len(c[0])]
      if not curves:
        continue
      x = functools.reduce(np.intersect1d, [c[0] for c in curves])  # steps every run logged
      n = len(x)
      window = smooth if n > 2 * smooth else 1
      ys = np.stack([analysis.moving_average(c[1][np.isin(c[0], x)], window) for c in curves])
      color = colors[i]
      ax.plot(x, ys.mean(0), color=color, label=label, lw=1.2, marker="o" if n < 12 else None, ms=3)
      if len(ys) > 1:
        ax.fill_between(x, ys.min(0), ys.max(0), color=color, alpha=0.2, lw=0)
    ax.set_title(key, fontsize=8)
    ax.set_xlabel("step", fontsize=7)
    ax.tick_params(labelsize=7)
  axes[0][0].legend(fontsize=6)
  if title:
    fig.suptitle(title, fontsize=9)
  return save_figure(fig, out_png)


def save_figure(fig, path: str) -> str:
  """Lays out, writes (small PNG, 80 dpi) and closes `fig`; returns `path`."""
  import matplotlib.pyplot as plt

  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def write_report(out_dir: str, name: str, text: str) -> str:
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, name)
  with open(path, "w") as f:
    f.write(text.rstrip() + "\n")
  print(text)
  return path


def base_args(description: str, default_out: str, archive: bool = False):
  """The studies' shared flags; `archive`: the study reads only its runs' records (no checkpoints
  or probes), so finished runs may be restored from `--archive`."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--quick", action="store_true", help="minutes: few steps, one seed")
  p.add_argument(
      "--preset",
      default="tiny",
      help="configs/<family>.py:<preset>: tiny (CPU) or a paper model, e.g. qwen2_5_7b",
  )
  p.add_argument(
      "--setting",
      default="countdown",
      choices=tuple(SETTINGS),
      help="the tiny preset's synthetic task (common.SETTINGS); paper presets read their data",
  )
  p.add_argument("--root", default=DEFAULT_ROOT, help="where run dirs live (shared across studies)")
  if archive:
    p.add_argument(
        "--archive",
        default=ARCHIVE,
        help="finished full runs' records are restored from and saved to here ('' for neither)",
    )
  p.add_argument("--out", default=os.path.join(REPO, "experiments", "results", default_out))
  return p


def archive_of(a) -> str | None:
  """The archive of parsed `base_args`: none for --quick runs (minutes; not results)."""
  return None if a.quick or not a.archive else a.archive


SCALING_RULE = (
    "Scaling rule for Clip-Cov / KL-Cov at tiny batch sizes: the tiny presets match EM's share of "
    "the positive covariance mass the rule acts on (`select/cov_mass_selected`), not its token "
    "count. From EM Table 1 (top 0.02 / 0.2 / 2 / 20 / 50% of tokens: mean covariance 5.654 / "
    "3.112 / 1.385 / 0.351 / 0.152) the positive mass is ~0.5 x 0.152 = 0.076 per token; KL-Cov's "
    "top 0.2% hold 0.002 x 3.112 = 0.0062 of it (8.2%), Clip-Cov's r = 2e-4 tokens from the band "
    "(1, 5) (mean 1.2-2.8) 0.3-0.7%. Tiny presets: KL-Cov k = 0.004 (7.5% measured), Clip-Cov "
    "r = 0.001, one token per mini-batch, the floor (1.3% measured); the earlier presets (r = k = "
    "0.02) held 18-20%. The tokens and the mass each rule touched are measured below."
)

# ----------------------------------------------------------------------------- probes


@dataclasses.dataclass
class Probe:
  """A policy loaded outside the trainer: model, tokenizer, task, config."""

  model: object
  model_cfg: object
  tokenizer: object
  task: object
  config: object


def load_probe(path: str) -> Probe:
  """The model of run dir `path` (its spec.json names the config)."""
  with open(os.path.join(path, "spec.json")) as f:
    s = json.load(f)
  c = load_config(s["family"], s["arg"], dict(map(tuple, s["overrides"])))
  from entropy_rl import data as data_lib, models, policy

  tok = data_lib.build_tokenizer(os.path.join(path, "tokenizer"))
  model_cfg = policy.tiny_model_config(c.model, len(tok))
  return Probe(models.Decoder(model_cfg), model_cfg, tok, data_lib.make_task(c.task), c)


def warm_params(path: str):
  """The shared warm start of run dir `path` (`warm_dir` of its root and task)."""
  from entropy_rl import warmstart
  from entropy_rl.models import hf

  with open(os.path.join(path, "spec.json")) as f:
    overrides = dict(map(tuple, json.load(f)["overrides"]))
  root = os.path.dirname(os.path.abspath(path))
  _, params = hf.load_hf(os.path.join(warm_dir(root, overrides), warmstart.MODEL_DIR))
  return params


def checkpoint_steps(path: str) -> list[int]:
  from entropy_rl import checkpoint

  with checkpoint.Checkpointer(os.path.join(path, "checkpoints"), async_save=False) as ck:
    return ck.all_steps()


def checkpoint_params(path: str, step: int):
  """Params of checkpoint `step` of run `path` (step 0: the warm start)."""
  if step == 0:
    return warm_params(path)
  from entropy_rl import checkpoint

  with checkpoint.Checkpointer(os.path.join(path, "checkpoints"), async_save=False) as ck:
    state, _ = ck.restore(step)
  return state["params"] if isinstance(state, dict) else state.params


def sample_probe(probe: Probe, params, num_prompts: int, num_samples: int, seed: int = 1234):
  """Responses of `params` to the first eval problems: dict of NumPy arrays plus texts."""
  import jax
  from entropy_rl import advantages, sampling
  from entropy_rl import data as data_lib

  c = probe.config
  examples = probe.task.eval_examples(num_prompts, seed=data_lib.EVAL_SEED)
  prompt, pmask = data_lib.encode_prompts(
      probe.tokenizer, [e.prompt for e in examples], c.task.max_prompt_len
  )
  stop = (probe.tokenizer.eos_token_id,)
  out = sampling.sample(
      probe.model,
      params,
      prompt,
      pmask,
      jax.random.key(seed),
      num_samples=num_samples,
      max_new_tokens=c.rollout.max_new_tokens,
      temperature=c.rollout.temperature,
      stop_ids=stop,
      pad_id=probe.tokenizer.pad_token_id,
      return_entropy=True,
  )
  tokens, mask = np.asarray(out.tokens_NxL), np.asarray(out.mask_NxL).astype(np.float32)
  texts = data_lib.decode_responses(probe.tokenizer, tokens, mask)
  rewards = np.array(
      [probe.task.score(examples[n // num_samples], t) for n, t in enumerate(texts)], np.float32
  )
  adv = np.asarray(advantages.grpo_advantages(rewards.reshape(-1, num_samples))).reshape(-1)
  return {
      "prompt": np.asarray(out.prompt_NxP),
      "prompt_mask": np.asarray(out.prompt_mask_NxP),
      "tokens": tokens,
      "mask": mask,
      "logp": np.asarray(out.logprobs_NxL),
      "entropy": np.asarray(out.entropy_NxL),
      "rewards": rewards,
      "adv": adv[:, None] * mask,
      "texts": texts,
      "examples": examples,
      "num_samples": num_samples,
  }


@functools.lru_cache(maxsize=4)
def _forward_fn(model):
  import jax

  @jax.jit
  def fwd(params, tokens, attn):
    return model.apply({"params": params}, tokens, attn_mask_BxT=attn)

  return fwd


def response_logits(probe: Probe, params, batch) -> np.ndarray:
  """Teacher-forced logits [N, L, V] at the response positions of `batch` (temperature-scaled)."""
  tokens = np.concatenate([batch["prompt"], batch["tokens"]], 1).astype(np.int32)
  attn = np.concatenate([batch["prompt_mask"], batch["mask"]], 1).astype(np.int32)
  p, l = batch["prompt"].shape[1], batch["tokens"].shape[1]
  logits = np.asarray(_forward_fn(probe.model)(params, tokens, attn), np.float64)
  return logits[:, p - 1 : p - 1 + l] / probe.config.rollout.temperature


def token_strings(probe: Probe, tokens) -> list[list[str]]:
  return [[probe.tokenizer.convert_ids_to_tokens(int(t)) for t in row] for row in tokens]


# ----------------------------------------------------------------------------- child process


def _child(argv):
  p = argparse.ArgumentParser()
  p.add_argument("--family", required=True)
  p.add_argument("--arg", default="tiny")
  p.add_argument("--workdir", required=True)
  p.add_argument("--overrides", default="{}")
  a = p.parse_args(argv)
  import jax

  jax.config.update("jax_threefry_partitionable", True)
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.WARNING)
  from entropy_rl import trainer

  c = load_config(a.family, a.arg, json.loads(a.overrides))
  trainer.train(c, a.workdir)


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "run":
    _child(sys.argv[2:])
  else:
    raise SystemExit("usage: python -m experiments.common run --family F --workdir D [...]")
