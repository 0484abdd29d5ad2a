#!/usr/bin/env bash
# Run N CPU processes on this machine as an N-host pod: the multi-host code path, testable anywhere.
#
#   launch/local_pod.sh [--devices-per-process K] [--port P] [--timeout S] N CMD [ARGS...]
#
# Every process runs the same CMD with the variables rrm_jax.distributed reads:
#   RRM_JAX_COORDINATOR=127.0.0.1:P  RRM_JAX_NUM_PROCESSES=N  RRM_JAX_PROCESS_ID=i  JAX_PLATFORMS=cpu
# and, with --devices-per-process, K CPU devices each (XLA_FLAGS=--xla_force_host_platform_device_count=K).
# JAX_COORDINATOR_BIND_ADDRESS=127.0.0.1:P keeps process 0's coordinator (an unauthenticated service,
# which JAX otherwise binds on every interface) reachable from this machine only.
# The port (free, picked at random unless --port) is reserved for the pod's lifetime by a lock file in
# ${TMPDIR:-/tmp}/rrm-local-pod-UID/, so that two pods started together never share one.
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

[[ -z "$port" || "$port" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$port'"

# JAX's coordinator binds with SO_REUSEPORT: a second pod on a port already in use would not fail, its
# processes would join either pod's coordinator. So each pod takes a lock on its port, held through fd 9
# by this script and the processes (which inherit it) until the last of them exits, and checks that
# nothing else listens there. The port is picked by binding port 0 and closing, so another program may
# take it before the coordinator starts: that is seen here as a taken port, and another one is tried.
lock_dir="${TMPDIR:-/tmp}/rrm-local-pod-$(id -u)"
mkdir -p "$lock_dir"
reserve_port() {  # $1: port; holds its lock on fd 9 when it succeeds
  exec 9> "$lock_dir/$1.lock"
  if python3 - "$1" 9>&9 <<'EOF'; then return 0; fi
import fcntl, socket, sys
try:
    fcntl.flock(9, fcntl.LOCK_EX | fcntl.LOCK_NB)  # on the open file that the shell keeps: outlives python
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the coordinator does: TIME_WAIT is free
        s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
EOF
  exec 9>&-
  return 1
}
if [[ -n "$port" ]]; then
  reserve_port "$port" || die "--port $port is in use (by another local pod or program); choose another or leave --port out"
else
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    reserve_port "$port" && break
    echo "local_pod.sh: port $port is in use; trying another" >&2
    port=""
  done
  [[ -n "$port" ]] || die "no free port found in 10 tries"
fi

export RRM_JAX_COORDINATOR="127.0.0.1:$port" JAX_COORDINATOR_BIND_ADDRESS="127.0.0.1:$port"
export RRM_JAX_NUM_PROCESSES="$n" JAX_PLATFORMS=cpu
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
