#!/usr/bin/env bash
# Launch entropy_rl on a Cloud TPU VM (one host or a pod slice) with gcloud.
#
#   ./launch_tpu.sh [options] create
#   ./launch_tpu.sh [options] setup
#   ./launch_tpu.sh [options] --workdir=gs://BUCKET/RUN run --config=configs/grpo.py:qwen2_5_7b [...]
#   ./launch_tpu.sh [options] logs | ssh [COMMAND] | stop | delete
#
# create  creates the TPU VM (or a queued resource with --queued) and waits until it is READY.
# setup   copies the repository to every worker and installs jax[tpu] (the version pinned in
#         requirements.txt) and requirements.txt into a virtualenv there.
# run     copies the repository to every worker and starts `python -m entropy_rl.main
#         --workdir=WORKDIR ARGS` on all of them (--worker=all), detached, each logging to
#         ~/entropy_rl_logs/run.log (uploaded to WORKDIR/logs/worker-N.log when it ends); then
#         follows worker 0's log (also saved locally under runs/launch_logs/NAME/, or
#         TPU_LOCAL_LOGS/NAME/). If the TPU is preempted it
#         deletes and re-creates it, waits for READY, runs setup and the same command again,
#         which resumes from the latest checkpoint in WORKDIR. Keep it running (tmux) for that;
#         the run itself survives the launcher exiting. A run that fails on a READY TPU is not
#         restarted. An SSH drop re-attaches.
# logs    follows the log of --worker (default 0).
# ssh     opens a shell on --worker, or runs COMMAND there.
# stop    sends SIGTERM to the run on every worker (it checkpoints and exits).
# delete  deletes the TPU VM (and its queued resource).
#
# Options (environment variable in brackets):
#   --name NAME               TPU name [TPU_NAME] (entropy-rl)
#   --zone ZONE               [TPU_ZONE] (us-central2-b)
#   --project PROJECT         [TPU_PROJECT] (gcloud's configured project)
#   --accelerator-type TYPE   [TPU_ACCELERATOR_TYPE] (v4-8)
#   --version VERSION         TPU runtime version [TPU_RUNTIME_VERSION] (tpu-ubuntu2204-base)
#   --spot                    spot capacity [TPU_SPOT=1]
#   --queued                  create through a queued resource [TPU_QUEUED=1]
#   --workdir GS_PATH         run's workdir: checkpoints, metrics [TPU_WORKDIR]
#   --worker N                worker for logs/ssh [TPU_WORKER] (0)
#   --env KEY=VALUE           extra environment for the run (repeatable)
#   --max-restarts N          re-creations after preemption [TPU_MAX_RESTARTS] (20)
#   --python PYTHON           Python on the workers [TPU_PYTHON] (python3.11)
#   --dry-run                 print every command instead of running it
# Everything after the subcommand that is not an option above (and everything after --) is
# passed to entropy_rl.main (run) or is the command (ssh).
set -euo pipefail

TPU_NAME="${TPU_NAME:-entropy-rl}"
TPU_ZONE="${TPU_ZONE:-us-central2-b}"
TPU_PROJECT="${TPU_PROJECT:-}"
TPU_ACCELERATOR_TYPE="${TPU_ACCELERATOR_TYPE:-v4-8}"
TPU_RUNTIME_VERSION="${TPU_RUNTIME_VERSION:-tpu-ubuntu2204-base}"
TPU_SPOT="${TPU_SPOT:-0}"
TPU_QUEUED="${TPU_QUEUED:-0}"
TPU_WORKDIR="${TPU_WORKDIR:-}"
TPU_WORKER="${TPU_WORKER:-0}"
TPU_MAX_RESTARTS="${TPU_MAX_RESTARTS:-20}"
TPU_PYTHON="${TPU_PYTHON:-python3.11}"
TPU_POLL_SECS="${TPU_POLL_SECS:-30}"
TPU_READY_TIMEOUT="${TPU_READY_TIMEOUT:-7200}"
TPU_LOCAL_LOGS="${TPU_LOCAL_LOGS:-}"
DRY_RUN=0

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# Expanded on the workers.
REMOTE_DIR="\$HOME/entropy_rl"
REMOTE_VENV="\$HOME/entropy_rl_venv"
REMOTE_LOGS="\$HOME/entropy_rl_logs"
# The worker's index in the slice, from the TPU VM metadata server.
WORKER_ID="\$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)"

die() { echo "launch_tpu.sh: $*" >&2; exit 2; }
note() { echo "launch_tpu.sh: $*" >&2; }

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

# One shell word: as is when safe, else single-quoted.
shq() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Prints a command (to the original stdout, even inside $(...)); runs it unless --dry-run.
exec 3>&1
run_cmd() {
  local line="+" word
  for word in "$@"; do line+=" $(shq "$word")"; done
  if [[ $DRY_RUN == 1 ]]; then
    echo "$line" >&3
    return 0
  fi
  echo "$line" >&2
  "$@"
}

EXTRA_ENV=()
ARGS=()
SUBCOMMAND=""

need_value() { [[ $# -ge 2 && -n $2 ]] || die "option $1 needs a value"; }

parse_args() {
  local passthrough=0 opt
  while [[ $# -gt 0 ]]; do
    if [[ $passthrough == 1 ]]; then
      ARGS+=("$1"); shift; continue
    fi
    opt="$1"
    # --opt=value -> --opt value
    if [[ $opt == --*=* ]]; then
      case "${opt%%=*}" in
        --name|--zone|--project|--accelerator-type|--version|--workdir|--worker|--env|\
--max-restarts|--python)
          set -- "${opt%%=*}" "${opt#*=}" "${@:2}"; opt="$1" ;;
      esac
    fi
    case "$opt" in
      --name) need_value "$@"; TPU_NAME="$2"; shift 2 ;;
      --zone) need_value "$@"; TPU_ZONE="$2"; shift 2 ;;
      --project) need_value "$@"; TPU_PROJECT="$2"; shift 2 ;;
      --accelerator-type) need_value "$@"; TPU_ACCELERATOR_TYPE="$2"; shift 2 ;;
      --version) need_value "$@"; TPU_RUNTIME_VERSION="$2"; shift 2 ;;
      --workdir) need_value "$@"; TPU_WORKDIR="$2"; shift 2 ;;
      --worker) need_value "$@"; TPU_WORKER="$2"; shift 2 ;;
      --env) need_value "$@"; [[ $2 == [A-Za-z_]*=* ]] || die "--env needs KEY=VALUE, got '$2'"
             EXTRA_ENV+=("$2"); shift 2 ;;
      --max-restarts) need_value "$@"; TPU_MAX_RESTARTS="$2"; shift 2 ;;
      --python) need_value "$@"; TPU_PYTHON="$2"; shift 2 ;;
      --spot) TPU_SPOT=1; shift ;;
      --queued) TPU_QUEUED=1; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h|--help) usage; exit 0 ;;
      --) passthrough=1; shift ;;
      *)
        if [[ -z $SUBCOMMAND ]]; then
          [[ $opt != -* ]] || die "unknown option '$opt' before the subcommand (see --help)"
          SUBCOMMAND="$opt"
        else
          ARGS+=("$opt")
        fi
        shift ;;
    esac
  done
  [[ -n $SUBCOMMAND ]] || { usage >&2; exit 2; }
  [[ $TPU_WORKER =~ ^[0-9]+$ ]] || die "--worker must be a worker index, got '$TPU_WORKER'"
  [[ $TPU_MAX_RESTARTS =~ ^[0-9]+$ ]] || die "--max-restarts must be >= 0, got '$TPU_MAX_RESTARTS'"
}

gcloud_tpu() {
  local scope=(--zone="$TPU_ZONE")
  [[ -z $TPU_PROJECT ]] || scope+=(--project="$TPU_PROJECT")
  run_cmd gcloud compute tpus "$@" "${scope[@]}"
}

# ssh WORKER COMMAND
tpu_ssh() { gcloud_tpu tpu-vm ssh "$TPU_NAME" --worker="$1" --command="$2"; }

# Prints the TPU VM state (READY, PREEMPTED, ...), or NOT_FOUND.
tpu_state() {
  if [[ $DRY_RUN == 1 ]]; then
    gcloud_tpu tpu-vm describe "$TPU_NAME" --format='value(state)'
    echo READY
    return 0
  fi
  local state
  state="$(gcloud_tpu tpu-vm describe "$TPU_NAME" --format='value(state)' 2>/dev/null)" || true
  echo "${state:-NOT_FOUND}"
}

wait_ready() {
  local waited=0 state
  while :; do
    state="$(tpu_state)"
    [[ $state == READY ]] && return 0
    (( waited < TPU_READY_TIMEOUT )) || die "TPU $TPU_NAME not READY after ${waited}s (state $state)"
    note "TPU $TPU_NAME is $state; waiting"
    sleep "$TPU_POLL_SECS"
    waited=$((waited + TPU_POLL_SECS))
  done
}

cmd_create() {
  local spot=()
  [[ $TPU_SPOT != 1 ]] || spot=(--spot)
  if [[ $TPU_QUEUED == 1 ]]; then
    gcloud_tpu queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" \
      --accelerator-type="$TPU_ACCELERATOR_TYPE" --runtime-version="$TPU_RUNTIME_VERSION" \
      "${spot[@]}"
  else
    gcloud_tpu tpu-vm create "$TPU_NAME" --accelerator-type="$TPU_ACCELERATOR_TYPE" \
      --version="$TPU_RUNTIME_VERSION" "${spot[@]}"
  fi
  wait_ready
}

cmd_delete() {
  if [[ $TPU_QUEUED == 1 ]]; then
    gcloud_tpu queued-resources delete "$TPU_NAME" --force --quiet
  else
    gcloud_tpu tpu-vm delete "$TPU_NAME" --quiet
  fi
}

# Copies the working tree (without .git, virtualenvs, local runs) to every worker.
copy_repo() {
  local tarball="${TMPDIR:-/tmp}/entropy_rl-${TPU_NAME}.tgz"
  run_cmd tar -czf "$tarball" --exclude=./.git --exclude=./.venv --exclude=./workdir \
    --exclude=./runs --exclude=__pycache__ -C "$REPO_ROOT" .
  gcloud_tpu tpu-vm scp "$tarball" "$TPU_NAME:entropy_rl.tgz" --worker=all
  tpu_ssh all "rm -rf ${REMOTE_DIR} && mkdir -p ${REMOTE_DIR} && tar -xzf \$HOME/entropy_rl.tgz -C ${REMOTE_DIR}"
}

cmd_setup() {
  local py
  py="$(shq "$TPU_PYTHON")"
  copy_repo
  tpu_ssh all "set -e; if ! ${py} -c 'import ensurepip, venv' 2>/dev/null; then sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q ${py} ${py}-venv; fi; ${py} -m venv ${REMOTE_VENV}; ${REMOTE_VENV}/bin/pip install -q -U pip; cd ${REMOTE_DIR} && ${REMOTE_VENV}/bin/pip install -q -r requirements-tpu.txt"
}

# Starts the run detached on every worker; the wrapper forwards SIGTERM to it and records its
# exit status. Refuses if a run is already active there.
start_run() {
  local env_str="ENTROPY_RL_DISTRIBUTED=1" e main wrapper
  for e in "${EXTRA_ENV[@]+"${EXTRA_ENV[@]}"}"; do
    env_str+=" ${e%%=*}=$(shq "${e#*=}")"
  done
  main="${env_str} ${REMOTE_VENV}/bin/python -m entropy_rl.main --workdir=$(shq "$TPU_WORKDIR")"
  for e in "${ARGS[@]+"${ARGS[@]}"}"; do main+=" $(shq "$e")"; done
  wrapper="cd ${REMOTE_DIR} || exit 1; ${main} >> ${REMOTE_LOGS}/run.log 2>&1 & child=\$!; trap 'kill -TERM \$child 2>/dev/null' TERM INT; wait \$child; rc=\$?; while kill -0 \$child 2>/dev/null; do wait \$child; rc=\$?; done; echo \$rc > ${REMOTE_LOGS}/exit_code; gcloud storage cp ${REMOTE_LOGS}/run.log $(shq "${TPU_WORKDIR%/}")/logs/worker-${WORKER_ID}.log >/dev/null 2>&1 || true"
  tpu_ssh all "mkdir -p ${REMOTE_LOGS}; if [ -f ${REMOTE_LOGS}/main.pid ] && kill -0 \$(cat ${REMOTE_LOGS}/main.pid) 2>/dev/null; then echo \"\$(hostname): a run is already active; use '$0 stop' first\" >&2; exit 3; fi; rm -f ${REMOTE_LOGS}/exit_code; echo \"=== \$(date -u) start\" >> ${REMOTE_LOGS}/run.log; nohup setsid bash -c $(shq "$wrapper") > /dev/null 2>&1 < /dev/null & echo \$! > ${REMOTE_LOGS}/main.pid"
}

# Follows worker 0's log until the run ends on every worker; exits with the run's status.
follow_run() {
  tpu_ssh all "pid=\$(cat ${REMOTE_LOGS}/main.pid); if [ ${WORKER_ID} = 0 ]; then tail -n 50 -F -s 0.5 --pid=\$pid ${REMOTE_LOGS}/run.log; else while kill -0 \$pid 2>/dev/null; do sleep 10; done; fi; exit \$(cat ${REMOTE_LOGS}/exit_code 2>/dev/null || echo 1)"
}

recreate() {
  note "re-creating TPU $TPU_NAME"
  if [[ $DRY_RUN == 1 || $(tpu_state) != NOT_FOUND ]]; then
    cmd_delete || true
  fi
  cmd_create
  cmd_setup
}

cmd_run() {
  [[ -n $TPU_WORKDIR ]] || die "run needs --workdir=gs://... (or TPU_WORKDIR)"
  [[ $TPU_WORKDIR == gs://* ]] || die "--workdir must be a gs:// path (worker disks are neither \
shared nor kept after a preemption), got '$TPU_WORKDIR'"
  local local_log restarts=0 rc state
  local_log="${TPU_LOCAL_LOGS:-$REPO_ROOT/runs/launch_logs}/$TPU_NAME/run-$(date -u +%Y%m%d-%H%M%S).log"
  [[ $DRY_RUN == 1 ]] || mkdir -p "$(dirname "$local_log")"
  while :; do
    state="$(tpu_state)"
    if [[ $state != READY ]]; then
      (( restarts < TPU_MAX_RESTARTS )) || die "TPU $TPU_NAME is $state after $restarts re-creations"
      restarts=$((restarts + 1))
      recreate
    fi
    copy_repo
    start_run
    while :; do
      rc=0
      if [[ $DRY_RUN == 1 ]]; then
        follow_run
      else
        follow_run 2>&1 | tee -a "$local_log" || rc=${PIPESTATUS[0]}
      fi
      [[ $rc != 0 ]] || { note "run finished"; break 2; }
      state="$(tpu_state)"
      [[ $state == READY ]] || { note "TPU $TPU_NAME is $state: preempted, restarting"; break; }
      if [[ $rc == 130 || $rc == 143 ]]; then  # 128 + SIGINT / SIGTERM: checkpointed and stopped
        note "run stopped by a signal (status $rc) after checkpointing; the same run command resumes"
        exit "$rc"
      fi
      [[ $rc == 255 ]] || die "run exited with status $rc on a READY TPU (not a preemption); \
not restarting. See '$0 logs' and $local_log"
      note "lost the SSH connection; re-attaching"
      sleep "$TPU_POLL_SECS"
    done
  done
  if [[ $DRY_RUN == 1 ]]; then
    echo "# if the TPU is preempted (state not READY), run repeats, at most $TPU_MAX_RESTARTS times:"
    recreate 2>/dev/null
    copy_repo
    start_run
    follow_run
  fi
}

main() {
  parse_args "$@"
  case "$SUBCOMMAND" in
    create) cmd_create ;;
    setup) cmd_setup ;;
    run) cmd_run ;;
    logs) tpu_ssh "$TPU_WORKER" "tail -n 200 -F ${REMOTE_LOGS}/run.log" ;;
    ssh)
      if [[ ${#ARGS[@]} -gt 0 ]]; then
        tpu_ssh "$TPU_WORKER" "${ARGS[*]}"
      else
        gcloud_tpu tpu-vm ssh "$TPU_NAME" --worker="$TPU_WORKER"
      fi ;;
    stop) tpu_ssh all "if [ -f ${REMOTE_LOGS}/main.pid ] && kill -TERM \$(cat ${REMOTE_LOGS}/main.pid) 2>/dev/null; then echo \"\$(hostname): sent SIGTERM\"; else echo \"\$(hostname): no active run\"; fi" ;;
    delete) cmd_delete ;;
    *) die "unknown subcommand '$SUBCOMMAND' (create, setup, run, logs, ssh, stop, delete)" ;;
  esac
}

main "$@"
