#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: every worker (host) of the slice runs the same program.
#
#   launch/tpu_run.sh [--dry-run] [OPTIONS] create | setup [--include PATH]... [--max-size MB]
#                                            | run --config FILE [ARGS...] | logs | stop | delete
#
# OPTIONS (each also read from the environment variable in capitals):
#   --name TPU_NAME  --zone ZONE  --project PROJECT (default: gcloud's)  --accelerator-type ACCELERATOR_TYPE
#   --runtime-version RUNTIME_VERSION  (the last two for create only, e.g. v5p-128 and v2-alpha-tpuv5)
#   --worker all     accepted for clarity; any other worker is refused (a slice runs one program on all hosts)
#   --dry-run        print every command instead of running it
#
#   create   create the slice
#   setup    copy this project's code (the files git tracks) to ~/rrm-jax on every worker and install it
#            with jax[tpu] and its gcs extra (gs:// run folders) into ~/rrm-venv (Python 3.11 through uv). Lists what it sends and the size first.
#            Never sent unless listed by their own path with --include: .env* files, credential files
#            (*.pem, *.key, *.p12, *.pfx, credentials*, id_rsa*/id_ecdsa*/id_ed25519*, .netrc,
#            .git-credentials, JSON holding a private_key, client_secret or refresh_token) and *.safetensors.
#     --include PATH  also send PATH (a file or a folder of the project, even an untracked or ignored one);
#                     repeatable. Inside a folder the files above are still left out.
#     --max-size MB   refuse to send more than MB megabytes (default 100)
#   run      copy FILE to ~/rrm-run.yaml on every worker and start `rrm-jax train --config ~/rrm-run.yaml ARGS`
#            there in the background (ARGS: train flags and key=value overrides); output in ~/rrm-run.log
#   logs     follow ~/rrm-run.log of worker 0 (process 0 is the one that logs)
#   stop     SIGTERM the run on every worker (the trainer saves a checkpoint first); only the process
#            group `run` started: its pid is recorded with its start time, so a reused pid is left alone
#   delete   delete the slice
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REMOTE_DIR='~/rrm-jax'
REMOTE_VENV='~/rrm-venv'
RUN_CONFIG='~/rrm-run.yaml'
RUN_LOG='~/rrm-run.log'
RUN_PID='~/rrm-run.pid'
MAX_SIZE_MB=100
# Remote shell functions. The pid file holds "PID START_TIME" (/proc/PID/stat's field 22, in clock ticks
# since boot): a pid the kernel has handed to another process since does not match, and is never signalled.
RUN_IS_ALIVE="start_time() { sed 's/.*) //' /proc/\$1/stat 2>/dev/null | cut -d' ' -f20; }; \
run_is_alive() { pid=; started=; [ -f $RUN_PID ] && read -r pid started < $RUN_PID && [ -n \"\$started\" ] && \
[ \"\$(start_time \"\$pid\")\" = \"\$started\" ]; }"

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
[[ "$command" == run || "$command" == setup || $# -eq 0 ]] || die "$command takes no arguments, got: $*"

need() { [[ -n "${!1:-}" ]] || die "$1 is not set: pass --$(tr 'A-Z_' 'a-z-' <<<"$1" | sed 's/tpu-name/name/') or export $1"; }
need TPU_NAME
need ZONE
location=(--zone="$ZONE")
[[ -z "${PROJECT:-}" ]] || location+=(--project="$PROJECT")

# shell words that can be pasted back into a shell (single quotes where needed; bash 3.2 has no @Q quoting)
quote_words() {
  local word line="" quote="'" escaped="'\\''"
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then line+=" $word"; else line+=" '${word//$quote/$escaped}'"; fi
  done
  echo "${line# }"
}
# every command goes through here: printed (one per line) under --dry-run, else run
run() {
  if [[ $dry_run -eq 1 ]]; then quote_words "$@"; else "$@"; fi
}
tpu_vm() { run gcloud compute tpus tpu-vm "$@"; }
on_all_workers() { tpu_vm ssh "$TPU_NAME" --worker=all "${location[@]}" --command="$1"; }

# ---------- setup: what is sent ----------

# why a file is never sent unless listed by its own path (prints the reason; fails for any other file)
never_sent() {
  case "${1##*/}" in
    .env*) echo "an environment file" ;;
    *.pem|*.key|*.p12|*.pfx|credentials*|id_rsa*|id_ecdsa*|id_ed25519*|.netrc|.git-credentials) echo "a credential file" ;;
    *.safetensors) echo "model weights" ;;
    *.json) grep -Eq '"(private_key|client_secret|refresh_token)"' "$ROOT/$1" 2>/dev/null && echo "a key file" ;;
    *) return 1 ;;
  esac
}

# PATH (relative to here) as a path relative to the project root; refused outside the project
project_path() {
  local path="$1" absolute
  [[ -e "$path" ]] || die "--include $path: no such file or folder"
  if [[ -d "$path" ]]; then absolute="$(cd "$path" && pwd)"; else absolute="$(cd "$(dirname "$path")" && pwd)/${path##*/}"; fi
  [[ "$absolute" == "$ROOT" ]] && die "--include $path is the whole project; list what to send inside it"
  [[ "$absolute" == "$ROOT/"* ]] || die "--include $path is outside the project ($ROOT)"
  echo "${absolute#"$ROOT/"}"
}

human_size() { awk -v b="$1" 'BEGIN { split("B kB MB GB TB", u); i = 1; while (b >= 1000 && i < 5) { b /= 1000; i++ }
  format = i == 1 ? "%d %s" : "%.1f %s"; printf format, b, u[i] }'; }

# sets `files` (sorted, relative to ROOT) from the tracked files and `includes`; prints what is sent and
# what is left out to stderr; refuses more than `max_size_mb`
choose_files() {
  local file reason listed candidates=() left_out=() sizes=() listed_files=() include
  while IFS= read -r -d '' file; do candidates+=("$file"); done < <(cd "$ROOT" && git ls-files -z --cached)
  for include in ${includes[@]+"${includes[@]}"}; do
    include="$(project_path "$include")" || exit 2
    if [[ -d "$ROOT/$include" ]]; then
      while IFS= read -r -d '' file; do candidates+=("${file#./}"); done < <(cd "$ROOT" && find "./$include" -type f -print0)
    else
      listed_files+=("$include")
    fi
  done
  files=()
  for file in ${candidates[@]+"${candidates[@]}"}; do
    [[ -e "$ROOT/$file" || -L "$ROOT/$file" ]] || continue  # tracked but deleted here
    if reason="$(never_sent "$file")"; then left_out+=("$file ($reason)"); else files+=("$file"); fi
  done
  files+=(${listed_files[@]+"${listed_files[@]}"})
  [[ ${#files[@]} -gt 0 ]] || die "no files to send: is $ROOT a git checkout?"
  local sorted=()
  while IFS= read -r -d '' file; do sorted+=("$file"); done < <(printf '%s\0' "${files[@]}" | LC_ALL=C sort -zu)
  files=("${sorted[@]}")

  local size_command=(stat -c %s)
  stat -c %s "$ROOT/setup.py" > /dev/null 2>&1 || size_command=(stat -f %z)  # BSD / macOS
  while IFS= read -r file; do sizes+=("$file"); done < <(cd "$ROOT" && printf '%s\0' "${files[@]}" | xargs -0 "${size_command[@]}")
  # one line per top-level entry of the project (files are sorted, so each entry's files are together)
  local total=0 i group="" group_files=0 group_bytes=0 lines=() top
  for i in "${!files[@]}"; do
    top="${files[$i]%%/*}"; [[ "$top" == "${files[$i]}" ]] || top+="/"
    if [[ "$top" != "$group" && -n "$group" ]]; then
      lines+=("$(summary_line "$group" "$group_files" "$group_bytes")"); group_files=0; group_bytes=0
    fi
    group="$top"; group_files=$((group_files + 1)); group_bytes=$((group_bytes + sizes[i])); total=$((total + sizes[i]))
  done
  lines+=("$(summary_line "$group" "$group_files" "$group_bytes")")
  echo "tpu_run.sh: sending ${#files[@]} files, $(human_size "$total") before compression, to every worker:" >&2
  printf '  %s\n' "${lines[@]}" >&2
  [[ ${#left_out[@]} -eq 0 ]] || {
    echo "tpu_run.sh: not sent (send one by listing its path with --include):" >&2
    printf '  %s\n' "${left_out[@]}" >&2
  }
  [[ $total -le $((max_size_mb * 1000000)) ]] || die "the files to send total $(human_size "$total"), above the \
limit of $max_size_mb MB; send less, or raise the limit with --max-size MB"
}
summary_line() {
  local plural=s; [[ $2 -ne 1 ]] || plural=""
  if [[ "$1" == */ ]]; then echo "$1 ($2 file$plural, $(human_size "$3"))"; else echo "$1 ($(human_size "$3"))"; fi
}

case "$command" in
  create)
    need ACCELERATOR_TYPE
    need RUNTIME_VERSION
    tpu_vm create "$TPU_NAME" "${location[@]}" --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION"
    ;;

  setup)
    includes=()
    max_size_mb=$MAX_SIZE_MB
    while [[ $# -gt 0 ]]; do
      case "$1" in
        --include) [[ $# -ge 2 ]] || die "--include needs a path"; includes+=("$2"); shift 2 ;;
        --include=*) includes+=("${1#*=}"); shift ;;
        --max-size) [[ $# -ge 2 ]] || die "--max-size needs a number of MB"; max_size_mb="$2"; shift 2 ;;
        --max-size=*) max_size_mb="${1#*=}"; shift ;;
        *) die "setup takes --include PATH and --max-size MB, got: $1" ;;
      esac
    done
    [[ "$max_size_mb" =~ ^[0-9]+$ ]] || die "--max-size must be a whole number of MB, got '$max_size_mb'"
    jax_version="$(sed -n 's/^JAX = "\([^"]*\)".*/\1/p' "$ROOT/setup.py")"  # the jax that setup.py pins
    [[ -n "$jax_version" ]] || die "cannot find the pinned jax version in $ROOT/setup.py"
    choose_files
    if [[ $dry_run -eq 1 ]]; then
      archive_dir="${TMPDIR:-/tmp}/rrm-jax-setup.XXXXXX"  # what mktemp would create
    else
      archive_dir="$(mktemp -d "${TMPDIR:-/tmp}/rrm-jax-setup.XXXXXX")"  # private: not a name others can predict
      trap 'rm -rf "$archive_dir"' EXIT
      trap 'exit 130' INT
      trap 'exit 143' TERM
    fi
    archive="$archive_dir/rrm-jax.tar.gz"
    run tar -C "$ROOT" -czf "$archive" -- "${files[@]}"
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
    on_all_workers "$RUN_IS_ALIVE; if run_is_alive; then \
echo \"\$(hostname): a run is still going (pid \$pid); tpu_run.sh stop first\" >&2; exit 1; fi; \
cd $REMOTE_DIR || exit 1; setsid nohup $REMOTE_VENV/bin/rrm-jax train --config $RUN_CONFIG$quoted_args > $RUN_LOG 2>&1 < /dev/null & \
echo \"\$! \$(start_time \$!)\" > $RUN_PID; echo \"\$(hostname): started, log in $RUN_LOG\""
    ;;

  logs)
    tpu_vm ssh "$TPU_NAME" --worker=0 "${location[@]}" --command="tail -n +1 -F $RUN_LOG"
    ;;

  stop)
    # the run is a session leader (setsid): signal its whole process group, if its leader is still the
    # process `run` started. The pid file stays, so that `run` refuses to start while the stopped run is
    # still writing its checkpoint.
    on_all_workers "$RUN_IS_ALIVE; if run_is_alive; then kill -TERM -- -\$pid 2>/dev/null || true; \
echo \"\$(hostname): stopped\"; else echo \"\$(hostname): no run going\"; fi"
    ;;

  delete)
    tpu_vm delete "$TPU_NAME" "${location[@]}" --quiet
    ;;
esac
