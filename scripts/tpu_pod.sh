#!/usr/bin/env bash
# Run easytune on a Cloud TPU VM pod: every worker runs the same command, JAX joins them.
set -euo pipefail

TPU_NAME="${TPU_NAME:-easytune}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
PROJECT="${PROJECT:-}"
REPO_URL="${REPO_URL:-}"
REMOTE_DIR="${REMOTE_DIR:-easytune}"
LOG_DIR="${LOG_DIR:-easytune_logs}"
TRAIN_MODULE="${TRAIN_MODULE:-easytune.train_sft}"
MESH_DIM="${MESH_DIM:-1,-1,1}"
PYTHON="${PYTHON:-python3}"

usage() {
  cat <<EOF
Usage: $(basename "$0") COMMAND [ARGS...]

Manage a Cloud TPU VM pod and run easytune on all of its workers with gcloud.

Commands:
  create           create the TPU VM (\$TPU_NAME, \$ZONE, \$ACCELERATOR_TYPE, \$RUNTIME_VERSION);
                   extra ARGS go to 'gcloud compute tpus tpu-vm create' (e.g. --spot)
  setup            put the repository on every worker (git clone \$REPO_URL, or copy this checkout)
                   and pip install -e '.[tpu]'
  launch [ARGS]    start '\$PYTHON -m \$TRAIN_MODULE --mesh_dim=\$MESH_DIM ARGS' on every worker in the
                   background; logs go to ~/\$LOG_DIR/train_<worker hostname>.log
  check [LINES]    show the last LINES (default 20) lines of every worker's log
  stop             stop the job started by 'launch' on every worker
  delete           delete the TPU VM

Environment (default):
  TPU_NAME ($TPU_NAME)  ZONE ($ZONE)  ACCELERATOR_TYPE ($ACCELERATOR_TYPE)
  RUNTIME_VERSION ($RUNTIME_VERSION; v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e)
  PROJECT (gcloud's default)  REPO_URL (unset: copy this checkout)  REMOTE_DIR ($REMOTE_DIR)
  LOG_DIR ($LOG_DIR)  TRAIN_MODULE ($TRAIN_MODULE)  MESH_DIM ($MESH_DIM)  PYTHON ($PYTHON)

Example:
  TPU_NAME=my-pod $(basename "$0") create && $(basename "$0") setup
  $(basename "$0") launch --model=meta-llama/Llama-3.2-1B --output_dir=gs://bucket/run1
  $(basename "$0") check 50
EOF
}

# Arguments every gcloud call shares; PROJECT is optional (gcloud config's project otherwise).
common_args() {
  COMMON=(--zone="$ZONE")
  if [[ -n "$PROJECT" ]]; then COMMON+=(--project="$PROJECT"); fi
}

# Run one shell command line on every worker at once.
on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${COMMON[@]}" --worker=all --command="$1"
}

# Quote for the remote bash so arguments with spaces or quotes arrive unchanged (plain words stay
# as they are, so the command reads as typed).
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then printf '%s' "$1"; else printf '%q' "$1"; fi
}

# A path on the workers: relative paths are under the remote home (tilde left for the remote shell).
remote_path() {
  # shellcheck disable=SC2088  # the tilde is for the remote shell to expand
  if [[ "$1" == /* ]]; then quote "$1"; else printf '~/%s' "$(quote "$1")"; fi
}

cmd_create() {
  gcloud compute tpus tpu-vm create "$TPU_NAME" "${COMMON[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "$@"
}

cmd_setup() {
  local dir install
  dir="$(remote_path "$REMOTE_DIR")"
  install="cd $dir && $(quote "$PYTHON") -m pip install -q -e '.[tpu]'"
  if [[ -n "$REPO_URL" ]]; then
    # Clone on first setup, fast-forward afterwards.
    on_all_workers "if [ -d $dir/.git ]; then git -C $dir pull --ff-only; \
else git clone $(quote "$REPO_URL") $dir; fi && $install"
  else
    # Ship this checkout's working tree (no .git, no build outputs) to every worker.
    local repo
    repo="$(cd "$(dirname "$0")/.." && pwd)"
    ARCHIVE="$(mktemp -t easytune.XXXXXX.tar.gz)"
    trap 'rm -f "$ARCHIVE"' EXIT
    tar -czf "$ARCHIVE" -C "$repo" --exclude=.git --exclude='*.egg-info' --exclude=__pycache__ \
      --exclude=.venv .
    gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME:easytune.tar.gz" "${COMMON[@]}" --worker=all
    on_all_workers "mkdir -p $dir && tar -xzf ~/easytune.tar.gz -C $dir && rm ~/easytune.tar.gz && $install"
  fi
}

cmd_launch() {
  local train arg log
  train="$(quote "$PYTHON") -m $(quote "$TRAIN_MODULE") $(quote "--mesh_dim=$MESH_DIM")"
  for arg in "$@"; do train+=" $(quote "$arg")"; done
  log="$(remote_path "$LOG_DIR")"
  # setsid + nohup + </dev/null: the job outlives the ssh session and ssh does not wait for it;
  # its pid leads a process group that 'stop' signals. EASYTUNE_DISTRIBUTED=1: every worker starts
  # jax.distributed, which reads the pod's layout from the TPU metadata.
  on_all_workers "mkdir -p $log && cd $(remote_path "$REMOTE_DIR") || exit 1; \
EASYTUNE_DISTRIBUTED=1 setsid nohup $train > $log/train_\$(hostname).log 2>&1 < /dev/null & \
echo \$! > $log/train.pid; echo \"\$(hostname): started pid \$(cat $log/train.pid)\""
}

cmd_check() {
  local lines="${1:-20}"
  [[ "$lines" =~ ^[0-9]+$ ]] || { echo "check: LINES must be a number, got '$lines'" >&2; exit 2; }
  on_all_workers "echo \"== \$(hostname)\"; tail -n $lines $(remote_path "$LOG_DIR")/train_\$(hostname).log"
}

cmd_stop() {
  local pid_file
  pid_file="$(remote_path "$LOG_DIR")/train.pid"
  on_all_workers "if [ -f $pid_file ]; then kill -- -\$(cat $pid_file) 2>/dev/null; rm -f $pid_file; \
echo \"\$(hostname): stopped\"; else echo \"\$(hostname): no job\"; fi"
}

cmd_delete() {
  gcloud compute tpus tpu-vm delete "$TPU_NAME" "${COMMON[@]}" --quiet
}

main() {
  if [[ $# -eq 0 ]]; then usage >&2; exit 2; fi
  local command="$1"; shift
  common_args
  case "$command" in
    -h|--help|help) usage ;;
    create) cmd_create "$@" ;;
    setup) cmd_setup ;;
    launch) cmd_launch "$@" ;;
    check) cmd_check "$@" ;;
    stop) cmd_stop ;;
    delete) cmd_delete ;;
    *) echo "unknown command '$command'" >&2; usage >&2; exit 2 ;;
  esac
}

main "$@"
