#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: every worker (host) of the slice runs the same program.
#
#   launch/tpu_run.sh [--dry-run] [OPTIONS] create | setup | run --config FILE [ARGS...] | logs | stop | delete
#
# OPTIONS (each also read from the environment variable in capitals):
#   --name TPU_NAME  --zone ZONE  --project PROJECT (default: gcloud's)  --accelerator-type ACCELERATOR_TYPE
#   --runtime-version RUNTIME_VERSION  (the last two for create only, e.g. v5p-128 and v2-alpha-tpuv5)
#   --worker all     accepted for clarity; any other worker is refused (a slice runs one program on all hosts)
#   --dry-run        print every command instead of running it
#
#   create   create the slice
#   setup    copy this project (tracked and untracked-but-not-ignored files) to ~/rrm-jax on every
#            worker and install it with jax[tpu] and its gcs extra (gs:// run folders) into ~/rrm-venv (Python 3.11 through uv)
#   run      copy FILE to ~/rrm-run.yaml on every worker and start `rrm-jax train --config ~/rrm-run.yaml ARGS`
#            there in the background (ARGS: train flags and key=value overrides); output in ~/rrm-run.log
#   logs     follow ~/rrm-run.log of worker 0 (process 0 is the one that logs)
#   stop     SIGTERM the run on every worker (the trainer saves a checkpoint first)
#   delete   delete the slice
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REMOTE_DIR='~/rrm-jax'
REMOTE_VENV='~/rrm-venv'
RUN_CONFIG='~/rrm-run.yaml'
RUN_LOG='~/rrm-run.log'
RUN_PID='~/rrm-run.pid'

die() { echo "tpu_run.sh: error: $*" >&2; exit 2; }

dry_run=0
check_worker() { [[ "$1" == all ]] || die "--worker $1 refused: every worker of a slice must run the same program; use --worker=all (the default)"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --name|--zone|--project|--accelerator-type|--runtime-version|--worker)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      value="$2"
      case "$1" in
        --name) TPU_NAME="$value" ;; --zone) ZONE="$value" ;; --project) PROJECT="$value" ;;
        --accelerator-type) ACCELERATOR_TYPE="$value" ;; --runtime-version) RUNTIME_VERSION="$value" ;;
        --worker) check_worker "$value" ;;
      esac
      shift 2 ;;
    --name=*) TPU_NAME="${1#*=}"; shift ;;
    --zone=*) ZONE="${1#*=}"; shift ;;
    --project=*) PROJECT="${1#*=}"; shift ;;
    --accelerator-type=*) ACCELERATOR_TYPE="${1#*=}"; shift ;;
    --runtime-version=*) RUNTIME_VERSION="${1#*=}"; shift ;;
    --worker=*) check_worker "${1#*=}"; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1" ;;
    *) break ;;
  esac
done

[[ $# -ge 1 ]] || die "missing sub-command: create, setup, run, logs, stop or delete"
command="$1"; shift
case "$command" in
  create|setup|run|logs|stop|delete) ;;
  *) die "unknown sub-command '$command': use create, setup, run, logs, stop or delete" ;;
esac
for arg in "$@"; do
  [[ "$arg" != --worker* ]] || die "$arg refused: every worker of a slice must run the same program"
done
[[ "$command" == run || $# -eq 0 ]] || die "$command takes no arguments, got: $*"

need() { [[ -n "${!1:-}" ]] || die "$1 is not set: pass --$(tr 'A-Z_' 'a-z-' <<<"$1" | sed 's/tpu-name/name/') or export $1"; }
need TPU_NAME
need ZONE
location=(--zone="$ZONE")
[[ -z "${PROJECT:-}" ]] || location+=(--project="$PROJECT")

# shell words that can be pasted back into a shell (single quotes where needed)
quote_words() {
  local word line=""
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then line+=" $word"; else line+=" ${word@Q}"; fi
  done
  echo "${line# }"
}
# every command goes through here: printed (one per line) under --dry-run, else run
run() {
  if [[ $dry_run -eq 1 ]]; then quote_words "$@"; else "$@"; fi
}
tpu_vm() { run gcloud compute tpus tpu-vm "$@"; }
on_all_workers() { tpu_vm ssh "$TPU_NAME" --worker=all "${location[@]}" --command="$1"; }

case "$command" in
  create)
    need ACCELERATOR_TYPE
    need RUNTIME_VERSION
    tpu_vm create "$TPU_NAME" "${location[@]}" --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION"
    ;;

  setup)
    archive="${TMPDIR:-/tmp}/rrm-jax-$TPU_NAME.tar.gz"
    jax_version="$(sed -n 's/^JAX = "\([^"]*\)".*/\1/p' "$ROOT/setup.py")"  # the jax that setup.py pins
    [[ -n "$jax_version" ]] || die "cannot find the pinned jax version in $ROOT/setup.py"
    pack="cd $(printf '%q' "$ROOT") && git ls-files -z --cached --others --exclude-standard | tar -czf $(printf '%q' "$archive") --null -T -"
    run bash -c "$pack"
    tpu_vm scp "$archive" "$TPU_NAME:rrm-jax.tar.gz" --worker=all "${location[@]}"
    # extracted over the old copy, so that models/ and data/ downloaded on the workers stay
    on_all_workers "set -e; mkdir -p $REMOTE_DIR && tar -xzf ~/rrm-jax.tar.gz -C $REMOTE_DIR && rm ~/rrm-jax.tar.gz; \
python3 -m pip install --user --quiet uv && ~/.local/bin/uv venv --allow-existing --python 3.11 $REMOTE_VENV && \
~/.local/bin/uv pip install --quiet --python $REMOTE_VENV/bin/python -e $REMOTE_DIR'[gcs]' 'jax[tpu]==$jax_version' && \
$REMOTE_VENV/bin/rrm-jax --help > /dev/null && echo \"rrm-jax installed on \$(hostname)\""
    ;;

  run)
    config=""
    train_args=()
    while [[ $# -gt 0 ]]; do
      case "$1" in
        --config) [[ $# -ge 2 ]] || die "--config needs a file"; config="$2"; shift 2 ;;
        --config=*) config="${1#*=}"; shift ;;
        *) train_args+=("$1"); shift ;;
      esac
    done
    [[ -n "$config" ]] || die "run needs --config FILE (e.g. configs/rrm_7b_v5p.yaml)"
    [[ -f "$config" ]] || die "--config $config: no such file"
    quoted_args=""
    [[ ${#train_args[@]} -eq 0 ]] || printf -v quoted_args ' %q' "${train_args[@]}"
    tpu_vm scp "$config" "$TPU_NAME:rrm-run.yaml" --worker=all "${location[@]}"
    on_all_workers "if [ -f $RUN_PID ] && kill -0 \$(cat $RUN_PID) 2>/dev/null; then \
echo \"\$(hostname): a run is still going (pid \$(cat $RUN_PID)); tpu_run.sh stop first\" >&2; exit 1; fi; \
cd $REMOTE_DIR || exit 1; setsid nohup $REMOTE_VENV/bin/rrm-jax train --config $RUN_CONFIG$quoted_args > $RUN_LOG 2>&1 < /dev/null & \
echo \$! > $RUN_PID; echo \"\$(hostname): started, log in $RUN_LOG\""
    ;;

  logs)
    tpu_vm ssh "$TPU_NAME" --worker=0 "${location[@]}" --command="tail -n +1 -F $RUN_LOG"
    ;;

  stop)
    # the run is a session leader (setsid): signal its whole process group. The pid file stays, so that
    # `run` refuses to start while the stopped run is still writing its checkpoint.
    on_all_workers "if [ -f $RUN_PID ]; then kill -TERM -- -\$(cat $RUN_PID) 2>/dev/null || true; fi; \
echo \"\$(hostname): stopped\""
    ;;

  delete)
    tpu_vm delete "$TPU_NAME" "${location[@]}" --quiet
    ;;
esac
