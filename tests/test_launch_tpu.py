"""launch_tpu.sh: shellcheck, the --dry-run commands of every subcommand, and the run loop
(start, follow, restart after preemption, stop) against a fake gcloud that runs each worker
command locally in a fake worker home directory."""

import os
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "launch_tpu.sh")

# One worker: `ssh --command=C` runs C with HOME=$FAKE_HOME; describe prints $FAKE_STATE.
FAKE_GCLOUD = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_DIR/gcloud.log"
if [[ $1 == storage && $2 == cp ]]; then cp "$3" "$FAKE_DIR/uploaded.log"; exit 0; fi
verb="$3 $4"
case "$verb" in
  "tpu-vm describe") [[ -f $FAKE_DIR/state ]] || exit 1; cat "$FAKE_DIR/state" ;;
  "tpu-vm create"|"queued-resources create") echo READY > "$FAKE_DIR/state" ;;
  "tpu-vm delete"|"queued-resources delete") rm -f "$FAKE_DIR/state" ;;
  "tpu-vm scp") cp "$5" "$FAKE_DIR/home/${6#*:}" ;;
  "tpu-vm ssh")
    for a in "$@"; do [[ $a == --command=* ]] && cmd="${a#--command=}"; done
    HOME="$FAKE_DIR/home" exec bash -c "$cmd" ;;
  *) echo "fake gcloud: unexpected $*" >&2; exit 9 ;;
esac
"""

FAKE_CURL = "#!/usr/bin/env bash\necho 0\n"

# The worker's python: `-c`/`-m venv` (setup) succeed; a run follows $FAKE_DIR/plan, one line
# per run: ok | fail | preempt | wait (until SIGTERM, then exit 143 as entropy_rl.main does).
FAKE_PYTHON = r"""#!/usr/bin/env bash
if [[ $1 == -c || $1 == -m && $2 == venv ]]; then exit 0; fi
n=$(( $(cat "$FAKE_DIR/runs" 2>/dev/null || echo 0) + 1 )); echo $n > "$FAKE_DIR/runs"
{ printf '%s\n' "$@"; echo "DIST=$ENTROPY_RL_DISTRIBUTED HF=$HF_HOME PWD=$PWD"; } > "$FAKE_DIR/args.$n"
case "$(sed -n "${n}p" "$FAKE_DIR/plan")" in
  ok) echo "training step 1"; exit 0 ;;
  fail) echo "Traceback: boom"; exit 7 ;;
  preempt) echo PREEMPTED > "$FAKE_DIR/state"; exit 137 ;;
  wait) trap 'echo got-TERM > "$FAKE_DIR/term"; exit 143' TERM; touch "$FAKE_DIR/waiting"
        while :; do sleep 0.1; done ;;
esac
"""


def _write_exec(path, text):
  path.write_text(text)
  path.chmod(0o755)


@pytest.fixture
def fake(tmp_path):
  bin_dir = tmp_path / "bin"
  venv = tmp_path / "home" / "entropy_rl_venv" / "bin"
  bin_dir.mkdir()
  venv.mkdir(parents=True)
  _write_exec(bin_dir / "gcloud", FAKE_GCLOUD)
  _write_exec(bin_dir / "curl", FAKE_CURL)
  _write_exec(bin_dir / "fakepy", FAKE_PYTHON)
  _write_exec(venv / "python", FAKE_PYTHON)
  _write_exec(venv / "pip", "#!/usr/bin/env bash\nexit 0\n")
  env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
  env.update(
      PATH=f"{bin_dir}:{env['PATH']}",
      FAKE_DIR=str(tmp_path),
      TMPDIR=str(tmp_path),
      TPU_POLL_SECS="0",
      TPU_PYTHON="fakepy",
      TPU_LOCAL_LOGS=str(tmp_path / "local"),
  )
  return tmp_path, env


def _launch(env, *args, check=True):
  proc = subprocess.run(
      ["bash", SCRIPT, *args], env=env, capture_output=True, text=True, timeout=60
  )
  if check:
    assert proc.returncode == 0, proc.stderr
  return proc


def test_shellcheck():
  shellcheck = pathlib.Path(sys.executable).parent / "shellcheck"
  proc = subprocess.run([str(shellcheck), SCRIPT], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout


def _dry(env, *args):
  proc = _launch(env, "--dry-run", "--name", "t1", "--zone", "z1", *args)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("+ ")]
  return lines, proc


def test_dry_run_runs_nothing_and_prints_each_command(fake):
  tmp, env = fake
  lines, _ = _dry(
      env, "--project=p", "--accelerator-type", "v5p-16", "--version=v2", "--spot", "create"
  )
  assert lines[0] == (
      "+ gcloud compute tpus tpu-vm create t1 --accelerator-type=v5p-16 "
      "--version=v2 --spot --zone=z1 --project=p"
  )
  assert "tpu-vm describe t1 '--format=value(state)'" in lines[1]
  lines, _ = _dry(env, "--queued", "create")
  assert lines[0] == (
      "+ gcloud compute tpus queued-resources create t1 --node-id=t1 "
      "--accelerator-type=v4-8 --runtime-version=tpu-ubuntu2204-base --zone=z1"
  )
  assert _dry(env, "--queued", "delete")[0] == [
      "+ gcloud compute tpus queued-resources delete t1 --force --quiet --zone=z1"
  ]
  assert _dry(env, "delete")[0] == ["+ gcloud compute tpus tpu-vm delete t1 --quiet --zone=z1"]

  lines, _ = _dry(env, "setup")
  assert lines[0].startswith("+ tar -czf ") and f"-C {ROOT} ." in lines[0]
  assert lines[1].startswith("+ gcloud compute tpus tpu-vm scp ") and "--worker=all" in lines[1]
  assert "tar -xzf $HOME/entropy_rl.tgz -C $HOME/entropy_rl" in lines[2]
  assert "--worker=all" in lines[3] and "pip install -q -r requirements-tpu.txt' " in lines[3]
  jax_pin = next(
      l for l in (ROOT / "requirements.txt").read_text().splitlines() if l.startswith("jax==")
  )
  tpu_requirements = (ROOT / "requirements-tpu.txt").read_text().splitlines()
  assert "-r requirements.txt" in tpu_requirements  # the same pins as the CPU install
  assert f"jax[tpu]=={jax_pin[5:]}" in tpu_requirements

  lines, proc = _dry(
      env,
      "--workdir=gs://b/r",
      "run",
      "--config=configs/grpo.py:tiny",
      "--env",
      "HF_HOME=/h f",
      "--config.num_steps=3",
  )
  starts = [l for l in lines if "entropy_rl.main" in l]
  assert len(starts) == 2  # The run, and the same command after a preemption.
  assert all("--worker=all" in l for l in lines if " ssh " in l)
  assert "--workdir=gs://b/r --config=configs/grpo.py:tiny --config.num_steps=3" in starts[0]
  assert "preempted" in proc.stdout
  after = lines[lines.index(starts[0]) :]
  assert any("tpu-vm delete t1" in l for l in after)
  assert any("tpu-vm create t1" in l for l in after)
  assert any("pip install" in l for l in after)

  assert _dry(env, "--worker=2", "logs")[0] == [
      "+ gcloud compute tpus tpu-vm ssh t1 --worker=2 "
      "'--command=tail -n 200 -F $HOME/entropy_rl_logs/run.log' --zone=z1"
  ]
  assert _dry(env, "ssh")[0] == ["+ gcloud compute tpus tpu-vm ssh t1 --worker=0 --zone=z1"]
  assert _dry(env, "ssh", "--", "ls", "-la")[0] == [
      "+ gcloud compute tpus tpu-vm ssh t1 --worker=0 '--command=ls -la' --zone=z1"
  ]
  (stop,), _ = _dry(env, "stop")
  assert "--worker=all" in stop and "kill -TERM" in stop

  assert not (tmp / "gcloud.log").exists()  # gcloud never ran.
  assert not list(tmp.glob("entropy_rl-*.tgz"))  # Nor tar.


@pytest.mark.parametrize(
    "args, message",
    [
        (["run"], "run needs --workdir"),
        (["--workdir=/local/dir", "run"], "must be a gs:// path"),
        (["launch"], "unknown subcommand 'launch'"),
        (["--bogus", "run"], "unknown option '--bogus'"),
        (["--worker=x", "logs"], "--worker must be"),
        (["--env", "novalue", "run"], "--env needs KEY=VALUE"),
        (["--name"], "option --name needs a value"),
    ],
)
def test_bad_arguments(fake, args, message):
  proc = _launch(fake[1], "--dry-run", *args, check=False)
  assert proc.returncode == 2 and message in proc.stderr


def _run_with_plan(fake, plan, *extra, check=True):
  tmp, env = fake
  (tmp / "plan").write_text("\n".join(plan) + "\n")
  (tmp / "state").write_text("READY\n")
  return _launch(
      env,
      "--name=t1",
      "--workdir=gs://b/r",
      *extra,
      "run",
      "--config=configs/x.py",
      "--config.task.path=/d/it's here.jsonl",
      check=check,
  )


def test_run_restarts_after_preemption_with_the_same_command(fake):
  tmp, _ = fake
  proc = _run_with_plan(fake, ["preempt", "ok"], "--env=HF_HOME=/h f")
  assert "preempted, restarting" in proc.stderr and "run finished" in proc.stderr
  first, second = (tmp / "args.1").read_text(), (tmp / "args.2").read_text()
  assert first == second
  assert first.splitlines()[:4] == [
      "-m",
      "entropy_rl.main",
      "--workdir=gs://b/r",
      "--config=configs/x.py",
  ]
  assert "--config.task.path=/d/it's here.jsonl" in first
  assert f"DIST=1 HF=/h f PWD={tmp}/home/entropy_rl" in first
  calls = (tmp / "gcloud.log").read_text()
  assert calls.count("tpu-vm delete t1") == 1 and calls.count("tpu-vm create t1") == 1
  assert (tmp / "home" / "entropy_rl" / "launch_tpu.sh").exists()  # The repository was copied.
  assert "training step 1" in (tmp / "uploaded.log").read_text()  # Per-worker log uploaded.
  assert "gs://b/r/logs/worker-0.log" in calls
  (local_log,) = (tmp / "local" / "t1").glob("run-*.log")  # Worker 0's log, followed.
  assert "training step 1" in local_log.read_text()


def test_failure_on_ready_tpu_is_not_restarted(fake):
  tmp, _ = fake
  proc = _run_with_plan(fake, ["fail", "ok"], check=False)
  assert proc.returncode == 2
  assert "exited with status 7 on a READY TPU" in proc.stderr
  assert (tmp / "runs").read_text().strip() == "1"
  assert "Traceback: boom" in (tmp / "home" / "entropy_rl_logs" / "run.log").read_text()


def test_stop_sends_sigterm_and_run_ends(fake):
  tmp, env = fake
  (tmp / "plan").write_text("wait\n")
  (tmp / "state").write_text("READY\n")
  run = subprocess.Popen(
      ["bash", SCRIPT, "--name=t1", "--workdir=gs://b/r", "run"],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
  try:
    deadline = time.time() + 30
    while not (tmp / "waiting").exists():
      assert time.time() < deadline and run.poll() is None
      time.sleep(0.1)
    # A second run on the same TPU is refused while one is active.
    proc = _run_with_plan(fake, ["ok"], check=False)
    assert proc.returncode == 3 and "already active" in proc.stderr
    _launch(env, "--name=t1", "stop")
    _, err = run.communicate(timeout=30)
  finally:
    if run.poll() is None:
      run.kill()
  assert run.returncode == 143, err  # stopped after checkpointing: not a failure to report
  assert "stopped by a signal (status 143) after checkpointing" in err
  assert (tmp / "term").read_text().strip() == "got-TERM"
  assert (tmp / "home" / "entropy_rl_logs" / "exit_code").read_text().strip() == "143"
