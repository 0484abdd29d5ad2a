"""Multi-process start-up (rrm_jax.distributed) and launch/local_pod.sh, with real CPU processes."""

import fcntl
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rrm_jax import distributed
from rrm_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
LOCAL_POD = ROOT / "launch" / "local_pod.sh"


def run_pod(args, tmp_path, script=None, timeout=120, env=None):
    """launch/local_pod.sh ARGS [python script.py] with the repository importable; -> (rc, stdout, stderr)."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("RRM_JAX_", "XLA_FLAGS", "JAX_COORD"))},
        **(env or {}),
    }
    env["PYTHONPATH"] = str(ROOT)
    cmd = [str(LOCAL_POD), *args]
    if script is not None:
        path = tmp_path / "script.py"
        path.write_text(textwrap.dedent(script))
        cmd += [sys.executable, str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=tmp_path)
    return done.returncode, done.stdout, done.stderr


def lines_of(process, stdout):
    prefix = f"[{process}] "
    return [line[len(prefix) :] for line in stdout.splitlines() if line.startswith(prefix)]


def test_psum_across_two_processes(tmp_path):
    # process i contributes i + 1 on each of its 2 devices: the global sum is 2 * (1 + 2) = 6
    rc, out, err = run_pod(
        ["--devices-per-process", "2", "2"],
        tmp_path,
        script="""
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from rrm_jax import distributed
        assert distributed.initialize(timeout_s=60)
        mesh = Mesh(np.array(jax.devices()), ("d",))
        local = np.full((jax.local_device_count(),), jax.process_index() + 1.0, np.float32)
        x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), local)
        total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
        print("result", jax.process_count(), jax.device_count(), float(total), distributed.is_main_process())
    """,
    )
    assert rc == 0, err + out
    assert "result 2 4 6.0 True" in lines_of(0, out)
    assert "result 2 4 6.0 False" in lines_of(1, out)


def test_collectives_between_processes(tmp_path):
    # any_process: a flag raised on process 1 only (a preemption signal) is seen by both;
    # gather_processes stacks each process's array; gather_to_host brings a sharded array whole to each process
    rc, out, err = run_pod(
        ["--devices-per-process", "2", "2"],
        tmp_path,
        script="""
        import jax, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from rrm_jax import distributed
        assert distributed.initialize(timeout_s=60)
        me = jax.process_index()
        raised = distributed.any_process(me == 1)
        quiet = distributed.any_process(False)
        stacked = distributed.gather_processes(np.array([me, 10 * me]))
        sharded = jax.device_put(np.arange(8), NamedSharding(Mesh(np.array(jax.devices()), ("d",)), P("d")))
        whole = distributed.gather_to_host({"x": sharded})["x"]
        distributed.barrier("done")
        print("result", raised, quiet, stacked.tolist(), whole.tolist())
    """,
    )
    assert rc == 0, err + out
    for process in range(2):
        assert "result True False [[0, 0], [1, 10]] [0, 1, 2, 3, 4, 5, 6, 7]" in lines_of(process, out)


def test_missing_process_fails_clearly_within_timeout(tmp_path):
    # process 1 exits without ever joining; process 0 must report it instead of waiting
    start = time.monotonic()
    rc, out, err = run_pod(
        ["--timeout", "3", "2"],
        tmp_path,
        script="""
        import os, sys
        if os.environ["RRM_JAX_PROCESS_ID"] == "1":
            sys.exit(0)
        from rrm_jax import distributed
        from rrm_jax.errors import UserError
        try:
            distributed.initialize()
        except UserError as e:
            print(f"error: {e}")
            sys.exit(2)
    """,
    )
    elapsed = time.monotonic() - start
    assert rc == 2
    assert "process 0 exited with status 2" in err
    errors = [line for line in lines_of(0, out) if line.startswith("error: ")]
    assert len(errors) == 1 and "not all of 2 processes" in errors[0] and "within 3s" in errors[0], out
    # 3 s deadline + interpreter start-up + jax's coordinator shutdown (about 5 s), far from jax's 5 minutes
    assert elapsed < 30


def test_local_pod_prefixes_output_and_returns_first_failure(tmp_path):
    rc, out, err = run_pod(
        [
            "3",
            "sh",
            "-c",
            'echo "hello from $RRM_JAX_PROCESS_ID of $RRM_JAX_NUM_PROCESSES"; '
            'test "$RRM_JAX_PROCESS_ID" != 1 || exit 7',
        ],
        tmp_path,
    )
    assert rc == 7
    assert "process 1 exited with status 7" in err and "process 0" not in err and "process 2" not in err
    for i in range(3):
        assert lines_of(i, out) == [f"hello from {i} of 3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_local_pod_sets_coordinator_and_cpu_devices(tmp_path):
    port = free_port()
    rc, out, err = run_pod(
        [
            "--devices-per-process",
            "3",
            "--port",
            str(port),
            "1",
            "sh",
            "-c",
            'echo "$RRM_JAX_COORDINATOR $JAX_COORDINATOR_BIND_ADDRESS $JAX_PLATFORMS $XLA_FLAGS"',
        ],
        tmp_path,
    )
    assert rc == 0, err
    # the coordinator binds loopback only (JAX binds every interface without JAX_COORDINATOR_BIND_ADDRESS)
    assert lines_of(0, out) == [f"127.0.0.1:{port} 127.0.0.1:{port} cpu --xla_force_host_platform_device_count=3"]


def hold_port_lock(tmp_path, port):
    """Take the lock a running local pod holds on `port` (its lock folder under TMPDIR=tmp_path)."""
    folder = tmp_path / f"rrm-local-pod-{os.getuid()}"
    folder.mkdir(exist_ok=True)
    lock = open(folder / f"{port}.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return lock


def test_local_pod_refuses_a_port_in_use(tmp_path):
    env = {"TMPDIR": str(tmp_path)}
    with socket.socket() as listening:  # another program
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        rc, out, err = run_pod(["--port", str(port), "1", "true"], tmp_path, env=env)
    assert rc == 2 and out == ""
    assert err == (
        f"local_pod.sh: error: --port {port} is in use (by another local pod or program); "
        f"choose another or leave --port out\n"
    )
    port = free_port()
    with hold_port_lock(tmp_path, port):  # another local pod, whose coordinator has not bound it yet
        rc, _, err = run_pod(["--port", str(port), "1", "true"], tmp_path, env=env)
        assert rc == 2 and f"--port {port} is in use" in err
    rc, out, err = run_pod(["--port", str(port), "1", "true"], tmp_path, env=env)
    assert rc == 0, err


def test_local_pod_picks_another_port_when_the_picked_one_is_taken(tmp_path):
    # a python3 whose first port pick returns a port another pod holds, as when two pods start together
    taken = free_port()
    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir()
    fake.write_text(f"""#!/bin/bash
if [[ "$*" == *getsockname* && ! -e {tmp_path}/picked ]]; then touch {tmp_path}/picked; echo {taken}; exit 0; fi
exec {shutil.which("python3")} "$@"
""")
    fake.chmod(0o755)
    env = {"TMPDIR": str(tmp_path), "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    with hold_port_lock(tmp_path, taken):
        rc, out, err = run_pod(["2", "sh", "-c", 'echo "$RRM_JAX_COORDINATOR"'], tmp_path, env=env)
    assert rc == 0, err
    assert err == f"local_pod.sh: port {taken} is in use; trying another\n"
    (coordinator,) = set(lines_of(0, out) + lines_of(1, out))
    assert coordinator.startswith("127.0.0.1:") and coordinator != f"127.0.0.1:{taken}"


def test_local_pod_rejects_bad_process_count(tmp_path):
    rc, out, err = run_pod(["zero", "true"], tmp_path)
    assert rc == 2 and "N must be a positive integer" in err


@pytest.fixture
def clean_env(monkeypatch):
    for name in (
        distributed.COORDINATOR_ENV,
        distributed.NUM_PROCESSES_ENV,
        distributed.PROCESS_ID_ENV,
        distributed.TIMEOUT_ENV,
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_single_process_starts_nothing(clean_env):
    assert distributed.initialize() is False
    assert distributed.initialize("127.0.0.1:1234", 1, 0) is False
    assert distributed.is_main_process()


@pytest.mark.parametrize(
    "args, message",
    [
        (("127.0.0.1:1234", 2, None), "missing --process-id"),
        ((None, 2, 0), "missing --coordinator"),
        (("127.0.0.1", 2, 0), "must be HOST:PORT"),
        (("127.0.0.1:1234", 2, 2), "--process-id 2 must be in 0..1"),
        (("127.0.0.1:1234", 0, 0), "--num-processes 0 must be at least 1"),
    ],
)
def test_inconsistent_settings_are_refused(clean_env, args, message):
    with pytest.raises(UserError, match=message):
        distributed.initialize(*args)


def test_environment_settings_are_validated(clean_env):
    clean_env.setenv(distributed.COORDINATOR_ENV, "127.0.0.1:1234")
    clean_env.setenv(distributed.NUM_PROCESSES_ENV, "two")
    with pytest.raises(UserError, match="RRM_JAX_NUM_PROCESSES='two' must be an integer"):
        distributed.initialize()
    clean_env.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(UserError, match="RRM_JAX_DISTRIBUTED_TIMEOUT='soon' is not a number"):
        distributed.initialize()


def test_cli_flags_reach_initialize(clean_env):
    import argparse

    parser = argparse.ArgumentParser()
    distributed.add_cli_flags(parser)
    args = parser.parse_args(
        ["--coordinator", "h:1", "--num-processes", "4", "--process-id", "5", "--distributed-timeout", "9"]
    )
    assert (args.coordinator, args.num_processes, args.process_id, args.distributed_timeout) == ("h:1", 4, 5, 9.0)
    with pytest.raises(UserError, match="--process-id 5 must be in 0..3"):
        distributed.initialize_from_args(args)
