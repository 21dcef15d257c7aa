"""The README's two commands, as a user types them.

The main command is taken verbatim from README.md and run from a fresh copy of the repository with
its relative workdir, shortened only by appended `--config.*` overrides, through two checkpoints
and a rerun that resumes. Its `python3 -m venv .venv` is the one part not rerun: the copy's
`.venv` is this interpreter's environment, which the pip part then checks against the pins.
"""

import os
import re
import shutil
import subprocess
import sys

from entropy_rl import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = (
    "--config.warm_start.steps=30 --config.eval.num_prompts=32 --config.eval_every=2 "
    "--config.checkpoint_every=2"
)


def _readme_command(after: str) -> str:
  """The first ```bash block after the line starting with `after`."""
  text = open(os.path.join(ROOT, "README.md")).read()
  start = text.index("\n" + after)
  block = re.search(r"```bash\n(.*?)\n```", text[start:], re.S)
  return block.group(1).strip()


def test_ci_runs_the_readme_test_command():
  command = _readme_command("Install and run the tests")
  assert command in open(os.path.join(ROOT, ".ci", "run")).read().splitlines()


def _fresh_copy(dst):
  shutil.copytree(
      ROOT,
      dst,
      ignore=shutil.ignore_patterns(
          ".git", ".venv", "runs", "__pycache__", "*.egg-info", ".pytest_cache"
      ),
  )
  os.symlink(sys.prefix, os.path.join(dst, ".venv"))


def test_readme_main_command_runs_as_typed(tmp_path):
  command = _readme_command("Run the main job")
  venv, *rest = command.split(" && ")
  assert venv == "python3 -m venv .venv"
  assert "--workdir=runs/" in rest[-1]  # a relative workdir, as a user types it
  repo = tmp_path / "repo"
  _fresh_copy(repo)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the user's devices
  workdir = repo / re.search(r"--workdir=(\S+)", rest[-1]).group(1)

  def run(num_steps):
    out = subprocess.run(
        " && ".join(rest) + f" {SHORT} --config.num_steps={num_steps}",
        shell=True,
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out

  run(4)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  out = run(6)  # the same command again, longer: resumes from step 4
  assert "resumed from step 4" in out.stderr
  steps = [r["step"] for r in metrics.read_metrics(workdir / "metrics.jsonl")]
  assert steps == list(range(7))  # each step once (0: the starting policy's evaluation)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6"]
  summary = (workdir / "summary.md").read_text()
  assert "| reward/mean |" in summary and "| eval/pass@1 |" in summary
  assert (workdir / "curves.png").read_bytes()[:4] == b"\x89PNG"
