#!/usr/bin/env bash
# Run N CPU processes on this machine as an N-host pod: the multi-host code path, testable anywhere.
#
#   launch/local_pod.sh [--devices-per-process K] [--port P] [--timeout S] N CMD [ARGS...]
#
# Every process runs the same CMD with the variables rrm_jax.distributed reads:
#   RRM_JAX_COORDINATOR=127.0.0.1:P  RRM_JAX_NUM_PROCESSES=N  RRM_JAX_PROCESS_ID=i  JAX_PLATFORMS=cpu
# and, with --devices-per-process, K CPU devices each (XLA_FLAGS=--xla_force_host_platform_device_count=K).
# Output lines are prefixed with "[i] ". Waits for all processes and exits with the first non-zero
# status (0 when all succeed); Ctrl-C stops them all.
set -euo pipefail

usage() { echo "usage: $0 [--devices-per-process K] [--port P] [--timeout S] N CMD [ARGS...]" >&2; exit 2; }
die() { echo "local_pod.sh: error: $*" >&2; exit 2; }

devices=""
port=""
timeout=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --devices-per-process) [[ $# -ge 2 ]] || usage; devices="$2"; shift 2 ;;
    --port) [[ $# -ge 2 ]] || usage; port="$2"; shift 2 ;;
    --timeout) [[ $# -ge 2 ]] || usage; timeout="$2"; shift 2 ;;
    -h|--help) usage ;;
    --) shift; break ;;
    -*) die "unknown option $1" ;;
    *) break ;;
  esac
done
[[ $# -ge 2 ]] || usage
n="$1"; shift
[[ "$n" =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer, got '$n'"
[[ -z "$devices" || "$devices" =~ ^[1-9][0-9]*$ ]] || die "--devices-per-process must be a positive integer, got '$devices'"

if [[ -z "$port" ]]; then  # a free port, so that several pods (e.g. parallel tests) do not collide
  port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
[[ "$port" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$port'"

export RRM_JAX_COORDINATOR="127.0.0.1:$port" RRM_JAX_NUM_PROCESSES="$n" JAX_PLATFORMS=cpu
[[ -z "$timeout" ]] || export RRM_JAX_DISTRIBUTED_TIMEOUT="$timeout"
if [[ -n "$devices" ]]; then
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices"
fi
export PYTHONUNBUFFERED=1  # prefixed lines arrive as they are written

# each process in its own process group, so that stopping the pod stops the commands, not only their shells
set -m
pids=()
cleanup() { for pid in "${pids[@]}"; do kill -- "-$pid" 2>/dev/null || true; done; }
trap 'cleanup; exit 130' INT TERM

for ((i = 0; i < n; i++)); do
  # each process's stdout and stderr go through one prefixing sed; $! is the subshell running both
  ( RRM_JAX_PROCESS_ID="$i" "$@" 2>&1 | sed -u "s/^/[$i] /"; exit "${PIPESTATUS[0]}" ) &
  pids+=("$!")
done

status=0
for i in "${!pids[@]}"; do
  rc=0
  wait "${pids[$i]}" || rc=$?
  if [[ $rc -ne 0 ]]; then
    echo "local_pod.sh: process $i exited with status $rc" >&2
    [[ $status -ne 0 ]] || status=$rc
  fi
done
exit "$status"
