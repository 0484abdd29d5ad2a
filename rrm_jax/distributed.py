"""Multi-process start-up: `jax.distributed` for TPU pods, GPU clusters and local CPU "pods".

A command that touches devices calls `initialize()` (or `initialize_from_args(args)` after
`add_cli_flags(parser)`) before its first JAX computation. Where the process settings come from,
first match wins:
  1. explicit arguments / flags: `--coordinator HOST:PORT --num-processes N --process-id I`;
  2. the environment variables set by `launch/local_pod.sh` (COORDINATOR_ENV, NUM_PROCESSES_ENV,
     PROCESS_ID_ENV);
  3. on a Cloud TPU VM, JAX's own detection from the TPU metadata (every worker of a slice);
  4. otherwise a single process: nothing to start.

JAX is imported on first use, not with this module, so that `rrm-jax <command> --help` (which adds
these flags) stays instant.

JAX aborts the whole process (a C++ fatal error) when the processes do not all register within its
initialization timeout, and waits for 5 minutes by default. So the registration runs in a helper
thread under our own deadline, and a missing process becomes a one-line UserError instead.
"""

from __future__ import annotations

import argparse
import json
import os
import threading

import numpy as np

from rrm_jax.errors import UserError

COORDINATOR_ENV = "RRM_JAX_COORDINATOR"
NUM_PROCESSES_ENV = "RRM_JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "RRM_JAX_PROCESS_ID"
TIMEOUT_ENV = "RRM_JAX_DISTRIBUTED_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
# JAX's own deadline is set far beyond ours so that ours always fires first with a clear message.
_JAX_TIMEOUT_MARGIN_S = 3600


def add_cli_flags(parser: argparse.ArgumentParser) -> None:
    """Flags for starting one process of several by hand (GPU clusters, local testing)."""
    group = parser.add_argument_group("multi-process (not needed on Cloud TPU VMs or under launch/local_pod.sh)")
    group.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        default=None,
        help=f"address of process 0; every process passes the same one (default: ${COORDINATOR_ENV}; "
        f"none: a single process, or a Cloud TPU VM's workers)",
    )
    group.add_argument(
        "--num-processes",
        type=int,
        metavar="N",
        default=None,
        help=f"number of processes (default: ${NUM_PROCESSES_ENV})",
    )
    group.add_argument(
        "--process-id", type=int, metavar="I", default=None, help=f"this process, 0..N-1 (default: ${PROCESS_ID_ENV})"
    )
    group.add_argument(
        "--distributed-timeout",
        type=float,
        metavar="SECONDS",
        default=None,
        help=f"how long to wait for all processes to arrive (default: {DEFAULT_TIMEOUT_S:.0f})",
    )


def initialize_from_args(args: argparse.Namespace) -> bool:
    """`initialize` with the flags of `add_cli_flags`."""
    return initialize(args.coordinator, args.num_processes, args.process_id, timeout_s=args.distributed_timeout)


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: float | None = None,
) -> bool:
    """Start jax.distributed when this is one of several processes; True when it did (or already had).

    Raises UserError on inconsistent settings, and when the processes do not all arrive within
    `timeout_s` seconds (default: $RRM_JAX_DISTRIBUTED_TIMEOUT or 300)."""
    import jax

    if jax.distributed.is_initialized():
        return True
    timeout_s = _timeout(timeout_s)
    if coordinator is None and num_processes is None and process_id is None:
        coordinator, num_processes, process_id = _from_environment()
    if coordinator is None and num_processes is None and process_id is None:
        if not _on_cloud_tpu_vm():
            return False
        _register({}, "the Cloud TPU VM workers of this slice", timeout_s)
        return True
    coordinator, num_processes, process_id = _validate(coordinator, num_processes, process_id)
    if num_processes == 1:
        return False
    # CPU devices need a cross-process collectives backend (jax 0.10.2 defaults to gloo; set it so a
    # change of default cannot turn psums across processes into errors). Accelerators ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    _register(
        dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id),
        f"{num_processes} processes at coordinator {coordinator} (this is process {process_id})",
        timeout_s,
    )
    return True


def is_main_process() -> bool:
    """Process 0 writes logs, metrics, plots and exports; the others stay quiet."""
    import jax

    return jax.process_index() == 0


def process_count() -> int:
    import jax

    return jax.process_count()


def process_index() -> int:
    import jax

    return jax.process_index()


# ---------- collectives between the processes (each a no-op with one process) ----------


def gather_to_host(tree):
    """Host numpy copies of a pytree of device arrays, whole on every process: arrays spread over several
    processes are all-gathered."""
    import jax
    from jax.experimental import multihost_utils

    leaves = jax.tree.leaves(tree)
    if any(isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated for x in leaves):
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, jax.device_get(tree))


def gather_processes(x: np.ndarray) -> np.ndarray:
    """[process_count, *x.shape]: every process's `x` (same shape everywhere), in process order."""
    from jax.experimental import multihost_utils

    if process_count() == 1:
        return np.asarray(x)[None]
    return np.asarray(multihost_utils.process_allgather(np.asarray(x)))


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on any: a decision all of them take together (e.g. to
    stop after a preemption signal that reached the hosts at different steps)."""
    if process_count() == 1:
        return flag
    return bool(gather_processes(np.array(flag)).any())


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier of this name."""
    if process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _to_bytes(obj) -> np.ndarray:
    return np.frombuffer(json.dumps(obj, ensure_ascii=False).encode("utf-8"), np.uint8)


def _from_bytes(data: np.ndarray):
    return json.loads(data.tobytes().decode("utf-8"))


def allgather_objects(obj) -> list:
    """Every process's `obj` (anything JSON can carry; sizes may differ), in process order, on every
    process: results computed by each process on its own share of the work."""
    if process_count() == 1:
        return [obj]
    data = _to_bytes(obj)
    sizes = gather_processes(np.array(len(data), np.int64))
    padded = np.zeros(max(int(sizes.max()), 1), np.uint8)
    padded[: len(data)] = data
    stacked = gather_processes(padded)
    return [_from_bytes(row[: int(n)]) for row, n in zip(stacked, sizes)]


def broadcast_object(obj):
    """Process 0's `obj` (JSON-able) on every process, e.g. what it read from a file only it can see;
    the other processes' `obj` is ignored."""
    if process_count() == 1:
        return obj
    from jax.experimental import multihost_utils

    data = _to_bytes(obj) if is_main_process() else np.zeros(0, np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.array(len(data), np.int64)))
    padded = np.zeros(max(size, 1), np.uint8)
    padded[: len(data)] = data[:size]
    return _from_bytes(np.asarray(multihost_utils.broadcast_one_to_all(padded))[:size])


def _register(kwargs: dict, who: str, timeout_s: float) -> None:
    failure: list[BaseException] = []

    import jax

    def connect():
        try:
            jax.distributed.initialize(**kwargs, initialization_timeout=int(timeout_s) + _JAX_TIMEOUT_MARGIN_S)
        except BaseException as e:  # reported on the calling thread
            failure.append(e)

    # daemon: a thread still waiting for a missing process must not keep the interpreter alive
    thread = threading.Thread(target=connect, name="jax-distributed-initialize", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise UserError(
            f"jax.distributed: not all of {who} arrived within {timeout_s:g}s; start every process "
            f"with the same coordinator and process count and distinct process ids, or raise "
            f"--distributed-timeout / ${TIMEOUT_ENV}"
        )
    if failure:
        raise UserError(f"jax.distributed could not start {who}: {failure[0]}".splitlines()[0])


def _timeout(timeout_s: float | None) -> float:
    if timeout_s is None:
        raw = os.environ.get(TIMEOUT_ENV)
        try:
            timeout_s = float(raw) if raw else DEFAULT_TIMEOUT_S
        except ValueError:
            raise UserError(f"${TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if timeout_s <= 0:
        raise UserError(f"distributed timeout {timeout_s} must be a positive number of seconds")
    return timeout_s


def _from_environment() -> tuple[str | None, int | None, int | None]:
    values = []
    for name in (COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV):
        raw = os.environ.get(name) or None
        if raw is not None and name != COORDINATOR_ENV:
            try:
                raw = int(raw)
            except ValueError:
                raise UserError(f"${name}={raw!r} must be an integer") from None
        values.append(raw)
    return tuple(values)


def _validate(coordinator, num_processes, process_id) -> tuple[str, int, int]:
    missing = [
        flag
        for flag, v in (
            ("--coordinator", coordinator),
            ("--num-processes", num_processes),
            ("--process-id", process_id),
        )
        if v is None
    ]
    if missing:
        raise UserError(
            f"multi-process start needs --coordinator, --num-processes and --process-id together "
            f"(or ${COORDINATOR_ENV}, ${NUM_PROCESSES_ENV}, ${PROCESS_ID_ENV}); missing {', '.join(missing)}"
        )
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--coordinator {coordinator!r} must be HOST:PORT, e.g. 10.0.0.1:8476")
    if num_processes < 1:
        raise UserError(f"--num-processes {num_processes} must be at least 1")
    if not 0 <= process_id < num_processes:
        raise UserError(
            f"--process-id {process_id} must be in 0..{num_processes - 1} for --num-processes {num_processes}"
        )
    return coordinator, num_processes, process_id


def _on_cloud_tpu_vm() -> bool:
    # jax decides this when it is imported (libtpu present and TPU chips attached); private, so guarded.
    try:
        from jax._src import cloud_tpu_init
    except ImportError:
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))
