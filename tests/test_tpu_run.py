"""launch/tpu_run.sh: the gcloud commands of every sub-command (--dry-run), refusals, and the remote
run / stop snippets executed locally against a fake `rrm-jax`."""

import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU_RUN = ROOT / "launch" / "tpu_run.sh"
ENV = {"TPU_NAME": "rrm-pod", "ZONE": "us-east5-a", "PROJECT": "my-project", "ACCELERATOR_TYPE": "v5p-128",
       "RUNTIME_VERSION": "v2-alpha-tpuv5"}
WHERE = ["--zone=us-east5-a", "--project=my-project"]
TPU_VM = ["gcloud", "compute", "tpus", "tpu-vm"]


def tpu_run(*args, env=ENV, cwd=ROOT):
    full_env = {k: v for k, v in os.environ.items() if k not in ENV}
    full_env.update(env)
    return subprocess.run([str(TPU_RUN), *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=60)


def dry_run(*args, **kw):
    done = tpu_run("--dry-run", *args, **kw)
    assert done.returncode == 0, done.stderr
    return [shlex.split(line) for line in done.stdout.splitlines()]


def remote_command(words):
    (command,) = [w.removeprefix("--command=") for w in words if w.startswith("--command=")]
    return command


def test_create():
    assert dry_run("create") == [TPU_VM + ["create", "rrm-pod", *WHERE, "--accelerator-type=v5p-128",
                                          "--version=v2-alpha-tpuv5"]]


def test_flags_override_environment_and_project_is_optional():
    env = {k: v for k, v in ENV.items() if k != "PROJECT"}
    assert dry_run("--name", "other", "--zone=europe-west4-b", "--accelerator-type", "v5p-8", "create", env=env) == [
        TPU_VM + ["create", "other", "--zone=europe-west4-b", "--accelerator-type=v5p-8", "--version=v2-alpha-tpuv5"]]


def test_setup_packs_copies_and_installs_on_all_workers(tmp_path):
    pack, copy, install = dry_run("setup", env={**ENV, "TMPDIR": str(tmp_path)})
    archive = str(tmp_path / "rrm-jax-rrm-pod.tar.gz")
    assert pack[:2] == ["bash", "-c"] and "git ls-files" in pack[2] and archive in pack[2]
    assert not Path(archive).exists()  # dry run: nothing ran
    assert copy == TPU_VM + ["scp", archive, "rrm-pod:rrm-jax.tar.gz", "--worker=all", *WHERE]
    assert install[:7] == TPU_VM + ["ssh", "rrm-pod", "--worker=all"] and install[7:9] == WHERE
    script = remote_command(install)
    assert "tar -xzf ~/rrm-jax.tar.gz -C ~/rrm-jax" in script
    assert "-e ~/rrm-jax 'jax[tpu]==0.10.2'" in script  # the jax that setup.py pins


def test_setup_archive_holds_the_project(tmp_path):
    # run the packing step itself (the first printed command) and look inside the archive
    pack = dry_run("setup", env={**ENV, "TMPDIR": str(tmp_path)})[0]
    subprocess.run(pack, check=True, timeout=60)
    names = subprocess.run(["tar", "-tzf", str(tmp_path / "rrm-jax-rrm-pod.tar.gz")], capture_output=True,
                           text=True, check=True).stdout.split()
    assert {"setup.py", "rrm_jax/cli.py", "launch/tpu_run.sh", "configs/rrm_7b_v5p.yaml"} <= set(names)
    assert not any(n.startswith((".venv/", ".git/")) for n in names)


def test_run_copies_config_and_starts_train_in_background_on_all_workers():
    copy, start = dry_run("run", "--config", "configs/rrm_7b_v5p.yaml", "--output-dir", "/mnt/runs/rrm-7b",
                          "max_steps=10", "data.source=data/my pairs.jsonl")
    assert copy == TPU_VM + ["scp", "configs/rrm_7b_v5p.yaml", "rrm-pod:rrm-run.yaml", "--worker=all", *WHERE]
    assert start[:7] == TPU_VM + ["ssh", "rrm-pod", "--worker=all"]
    script = remote_command(start)
    assert ("setsid nohup ~/rrm-venv/bin/rrm-jax train --config ~/rrm-run.yaml --output-dir /mnt/runs/rrm-7b "
            "max_steps=10 data.source=data/my\\ pairs.jsonl > ~/rrm-run.log 2>&1 < /dev/null &") in script


def test_logs_follow_worker_0_and_stop_and_delete():
    assert dry_run("logs") == [TPU_VM + ["ssh", "rrm-pod", "--worker=0", *WHERE, "--command=tail -n +1 -F ~/rrm-run.log"]]
    (stop,) = dry_run("stop")
    assert stop[:7] == TPU_VM + ["ssh", "rrm-pod", "--worker=all"] and "kill -TERM" in remote_command(stop)
    assert dry_run("delete") == [TPU_VM + ["delete", "rrm-pod", *WHERE, "--quiet"]]


@pytest.mark.parametrize("args, env, message", [
    (["--worker", "3", "stop"], ENV, "--worker 3 refused"),
    (["--worker=0,1", "logs"], ENV, "--worker 0,1 refused"),
    (["run", "--config", "configs/rrm_7b_v5p.yaml", "--worker=1"], ENV, "--worker=1 refused"),
    (["run", "max_steps=1"], ENV, "run needs --config FILE"),
    (["run", "--config", "nope.yaml"], ENV, "--config nope.yaml: no such file"),
    (["stop"], {"ZONE": "us-east5-a"}, "TPU_NAME is not set: pass --name or export TPU_NAME"),
    (["create"], {"TPU_NAME": "x", "ZONE": "z", "RUNTIME_VERSION": "v"}, "ACCELERATOR_TYPE is not set"),
    (["launch"], ENV, "unknown sub-command 'launch'"),
    (["logs", "extra"], ENV, "logs takes no arguments"),
    ([], ENV, "missing sub-command"),
])
def test_refusals(args, env, message):
    done = tpu_run("--dry-run", *args, env=env)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("tpu_run.sh: error: ") and message in done.stderr


def test_worker_all_is_accepted():
    assert dry_run("--worker", "all", "delete") == dry_run("--worker=all", "delete") == dry_run("delete")


def test_remote_run_and_stop_scripts(tmp_path):
    # the scripts that `run` and `stop` send to every worker, run here with HOME=tmp_path and a fake rrm-jax
    fake = tmp_path / "rrm-venv" / "bin" / "rrm-jax"
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/bin/bash\ntrap \'echo "saved on SIGTERM"; exit 0\' TERM\necho "args: $*"\n'
                    'while true; do sleep 0.1; done\n')
    fake.chmod(0o755)
    (tmp_path / "rrm-jax").mkdir()
    start = remote_command(dry_run("run", "--config", "configs/rrm_7b_v5p.yaml", "max_steps=3")[1])
    stop = remote_command(dry_run("stop")[0])
    env = {"HOME": str(tmp_path), "PATH": os.environ["PATH"]}

    def remote(script):
        return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=30)

    log = tmp_path / "rrm-run.log"
    assert remote(start).returncode == 0
    deadline = time.monotonic() + 10
    while "args:" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert log.read_text() == "args: train --config ~/rrm-run.yaml max_steps=3\n".replace("~", str(tmp_path))
    again = remote(start)  # a second run is refused while the first one is alive
    assert again.returncode == 1 and "a run is still going" in again.stderr
    assert remote(stop).returncode == 0
    while "saved" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert log.read_text().endswith("saved on SIGTERM\n")
    pid = int((tmp_path / "rrm-run.pid").read_text())
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)


def alive(pid: int) -> bool:
    """Running (an exited process left unreaped by a container's init counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_remote_run_passes_shell_syntax_in_train_arguments_verbatim(tmp_path):
    # `run`'s script for the workers, run here with HOME=tmp_path: a fake rrm-jax writes the arguments it
    # received, NUL-separated; a command substitution, quotes, ;, a newline, a glob and a variable are data
    fake = tmp_path / "rrm-venv" / "bin" / "rrm-jax"
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/bin/bash\nprintf "%s\\0" "$@" > ~/received.part && mv ~/received.part ~/received\n')
    fake.chmod(0o755)
    (tmp_path / "rrm-jax").mkdir()
    tricky = ["data.source=$(touch pwned)", "name=it's \"quoted\"", "a=1; touch pwned", "note=two\nlines",
              "b=`touch pwned`", "c=$HOME", "d=*", "e=\\n"]
    start = remote_command(dry_run("run", "--config", "configs/rrm_7b_v5p.yaml", *tricky)[1])
    done = subprocess.run(["bash", "-c", start], capture_output=True, text=True, timeout=30,
                          env={"HOME": str(tmp_path), "PATH": os.environ["PATH"]})
    assert done.returncode == 0, done.stderr
    received = tmp_path / "received"
    deadline = time.monotonic() + 10
    while not received.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert received.read_text().split("\0")[:-1] == ["train", "--config", str(tmp_path / "rrm-run.yaml"), *tricky]
    assert not list(tmp_path.rglob("pwned"))
