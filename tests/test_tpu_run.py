"""launch/tpu_run.sh: the gcloud commands of every sub-command (--dry-run), refusals, and the remote
run / stop snippets executed locally against a fake `rrm-jax`."""

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU_RUN = ROOT / "launch" / "tpu_run.sh"
ENV = {
    "TPU_NAME": "rrm-pod",
    "ZONE": "us-east5-a",
    "PROJECT": "my-project",
    "ACCELERATOR_TYPE": "v5p-128",
    "RUNTIME_VERSION": "v2-alpha-tpuv5",
}
WHERE = ["--zone=us-east5-a", "--project=my-project"]
TPU_VM = ["gcloud", "compute", "tpus", "tpu-vm"]


def tpu_run(*args, env=ENV, cwd=ROOT, script=TPU_RUN):
    full_env = {k: v for k, v in os.environ.items() if k not in ENV}
    full_env.update(env)
    return subprocess.run([str(script), *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=60)


def dry_run(*args, **kw):
    done = tpu_run("--dry-run", *args, **kw)
    assert done.returncode == 0, done.stderr
    return [shlex.split(line) for line in done.stdout.splitlines()]


def remote_command(words):
    (command,) = [w.removeprefix("--command=") for w in words if w.startswith("--command=")]
    return command


def test_create():
    assert dry_run("create") == [
        TPU_VM + ["create", "rrm-pod", *WHERE, "--accelerator-type=v5p-128", "--version=v2-alpha-tpuv5"]
    ]


def test_flags_override_environment_and_project_is_optional():
    env = {k: v for k, v in ENV.items() if k != "PROJECT"}
    assert dry_run("--name", "other", "--zone=europe-west4-b", "--accelerator-type", "v5p-8", "create", env=env) == [
        TPU_VM + ["create", "other", "--zone=europe-west4-b", "--accelerator-type=v5p-8", "--version=v2-alpha-tpuv5"]
    ]


def test_setup_packs_copies_and_installs_on_all_workers(tmp_path):
    pack, copy, install = dry_run("setup", env={**ENV, "TMPDIR": str(tmp_path)})
    archive = f"{tmp_path}/rrm-jax-setup.XXXXXX/rrm-jax.tar.gz"  # the name pattern of the private folder
    assert pack[:6] == ["tar", "-C", str(ROOT), "-czf", archive, "--"]
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert pack[6:] == sorted(f for f in tracked if (ROOT / f).exists())  # this checkout holds no secrets
    assert list(tmp_path.iterdir()) == []  # dry run: nothing ran
    assert copy == TPU_VM + ["scp", archive, "rrm-pod:rrm-jax.tar.gz", "--worker=all", *WHERE]
    assert install[:7] == TPU_VM + ["ssh", "rrm-pod", "--worker=all"] and install[7:9] == WHERE
    script = remote_command(install)
    assert "tar -xzf ~/rrm-jax.tar.gz -C ~/rrm-jax" in script
    assert "-e ~/rrm-jax'[gcs]' 'jax[tpu]==0.10.2'" in script  # the jax that setup.py pins; gcsfs for gs:// runs


# ---------- setup for real, against a fake gcloud, in a small git checkout with secrets lying around

CODE = {
    "setup.py": 'JAX = "0.10.2"\n',
    "rrm_jax/cli.py": "print('hi')\n",
    ".gitignore": "data/\n",
    "configs/run.json": '{"steps": 3}\n',
}
# committed by mistake: each is left out unless listed by its own path
SECRETS = {
    "configs/.env.prod": ("HF_TOKEN=hf_x\n", "an environment file"),
    "keys/pod-sa.json": ('{"type": "service_account", "private_key": "-----BEGIN"}', "a key file"),
    "certs/server.pem": ("-----BEGIN\n", "a credential file"),
    "models/tiny/model.safetensors": ("weights", "model weights"),
}
UNTRACKED = {"notes.txt": "todo\n", ".env": "HF_TOKEN=hf_y\n", "data/pairs.jsonl": "{}\n", "data/.env.local": "K=v\n"}
FAKE_GCLOUD = """#!/bin/bash
printf '%s\\n' "$*" >> "$FAKE_GCLOUD_DIR/calls"
if [[ "$4" == scp && "$5" == *.tar.gz ]]; then cp "$5" "$FAKE_GCLOUD_DIR/received.tar.gz"; fi
"""


@pytest.fixture
def project(tmp_path):
    """(root, run): a git checkout with a copy of the launcher, and a runner of it with a fake gcloud."""
    root = tmp_path / "project"
    tracked = {**CODE, **{name: text for name, (text, _) in SECRETS.items()}}
    for name, text in {**tracked, **UNTRACKED}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "launch").mkdir()
    shutil.copy(TPU_RUN, root / "launch" / "tpu_run.sh")
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "launch", *tracked], check=True)
    subprocess.run(git + ["commit", "-qm", "project"], check=True)
    fake = tmp_path / "bin" / "gcloud"
    fake.parent.mkdir()
    fake.write_text(FAKE_GCLOUD)
    fake.chmod(0o755)
    (tmp_path / "tmp").mkdir()

    def run(*args):
        env = {
            **ENV,
            "PATH": f"{fake.parent}:{os.environ['PATH']}",
            "TMPDIR": str(tmp_path / "tmp"),
            "FAKE_GCLOUD_DIR": str(tmp_path),
        }
        done = tpu_run(*args, env=env, cwd=root, script=root / "launch" / "tpu_run.sh")
        calls = (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() else []
        received = tmp_path / "received.tar.gz"
        names = (
            set(
                subprocess.run(
                    ["tar", "-tzf", str(received)], capture_output=True, text=True, check=True
                ).stdout.split()
            )
            if received.exists()
            else None
        )
        assert list((tmp_path / "tmp").iterdir()) == []  # the archive and its folder are gone, whatever happened
        return done, calls, names

    return root, run


def test_setup_sends_tracked_code_only_and_says_what(project):
    root, run = project
    done, calls, names = run("setup")
    assert done.returncode == 0, done.stderr
    assert names == set(CODE) | {"launch/tpu_run.sh"}
    size = sum(len((root / name).read_bytes()) for name in names)
    assert 1000 < size < 100_000  # the launcher makes it kilobytes
    assert f"tpu_run.sh: sending 5 files, {size / 1000:.1f} kB before compression, to every worker:\n" in done.stderr
    assert "  configs/ (1 file, 13 B)\n  launch/ (1 file," in done.stderr and "  setup.py (15 B)\n" in done.stderr
    not_sent = done.stderr.split("not sent (send one by listing its path with --include):\n")[1].splitlines()
    assert not_sent == [f"  {name} ({why})" for name, (_, why) in sorted(SECRETS.items())]
    assert [c.split()[3] for c in calls] == ["scp", "ssh"]  # copied, then installed


def test_setup_sends_what_is_listed(project):
    root, run = project
    done, _, names = run(
        "setup", "--include", "data", "--include=keys/pod-sa.json", "--include", "models/tiny/model.safetensors"
    )
    assert done.returncode == 0, done.stderr
    # a listed folder brings its files but not the secrets in it; a secret listed by its own path goes
    assert names == set(CODE) | {
        "launch/tpu_run.sh",
        "data/pairs.jsonl",
        "keys/pod-sa.json",
        "models/tiny/model.safetensors",
    }
    assert "  data/.env.local (an environment file)\n" in done.stderr


def test_setup_refuses_too_much_before_packing_anything(project):
    root, run = project
    (root / "blob.bin").write_bytes(b"x" * 1_500_000)
    subprocess.run(["git", "-C", str(root), "add", "blob.bin"], check=True)
    done, calls, names = run("setup", "--max-size", "1")
    assert done.returncode == 2 and calls == [] and names is None
    assert done.stderr.splitlines()[-1] == (
        "tpu_run.sh: error: the files to send total 1.5 MB, above the limit of "
        "1 MB; send less, or raise the limit with --max-size MB"
    )
    done, _, names = run("setup", "--max-size", "2")
    assert done.returncode == 0 and "blob.bin" in names


def test_dry_run_words_paste_back_into_a_shell():
    # quote_words is written without ${word@Q}, which needs bash >= 4.4 (macOS ships bash 3.2)
    name = 'it\'s a "pod" $(x); y'
    assert dry_run("--name", name, "delete") == [TPU_VM + ["delete", name, *WHERE, "--quiet"]]
    assert not re.search(r"\$\{[^}]*@Q\}", TPU_RUN.read_text())


def test_run_copies_config_and_starts_train_in_background_on_all_workers():
    copy, start = dry_run(
        "run",
        "--config",
        "configs/rrm_7b_v5p.yaml",
        "--output-dir",
        "/mnt/runs/rrm-7b",
        "max_steps=10",
        "data.source=data/my pairs.jsonl",
    )
    assert copy == TPU_VM + ["scp", "configs/rrm_7b_v5p.yaml", "rrm-pod:rrm-run.yaml", "--worker=all", *WHERE]
    assert start[:7] == TPU_VM + ["ssh", "rrm-pod", "--worker=all"]
    script = remote_command(start)
    assert (
        "setsid nohup ~/rrm-venv/bin/rrm-jax train --config ~/rrm-run.yaml --output-dir /mnt/runs/rrm-7b "
        "max_steps=10 data.source=data/my\\ pairs.jsonl > ~/rrm-run.log 2>&1 < /dev/null &"
    ) in script


def test_logs_follow_worker_0_and_stop_and_delete():
    assert dry_run("logs") == [
        TPU_VM + ["ssh", "rrm-pod", "--worker=0", *WHERE, "--command=tail -n +1 -F ~/rrm-run.log"]
    ]
    (stop,) = dry_run("stop")
    assert stop[:7] == TPU_VM + ["ssh", "rrm-pod", "--worker=all"] and "kill -TERM" in remote_command(stop)
    assert dry_run("delete") == [TPU_VM + ["delete", "rrm-pod", *WHERE, "--quiet"]]


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--worker", "3", "stop"], ENV, "--worker 3 refused"),
        (["--worker=0,1", "logs"], ENV, "--worker 0,1 refused"),
        (["run", "--config", "configs/rrm_7b_v5p.yaml", "--worker=1"], ENV, "--worker=1 refused"),
        (["run", "max_steps=1"], ENV, "run needs --config FILE"),
        (["run", "--config", "nope.yaml"], ENV, "--config nope.yaml: no such file"),
        (["stop"], {"ZONE": "us-east5-a"}, "TPU_NAME is not set: pass --name or export TPU_NAME"),
        (["create"], {"TPU_NAME": "x", "ZONE": "z", "RUNTIME_VERSION": "v"}, "ACCELERATOR_TYPE is not set"),
        (["launch"], ENV, "unknown sub-command 'launch'"),
        (["logs", "extra"], ENV, "logs takes no arguments"),
        (["setup", "extra"], ENV, "setup takes --include PATH and --max-size MB, got: extra"),
        (["setup", "--include", "/etc"], ENV, "--include /etc is outside the project"),
        (["setup", "--include", "nope"], ENV, "--include nope: no such file or folder"),
        (["setup", "--max-size", "1e3"], ENV, "--max-size must be a whole number of MB, got '1e3'"),
        ([], ENV, "missing sub-command"),
    ],
)
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
    fake.write_text(
        '#!/bin/bash\ntrap \'echo "saved on SIGTERM"; exit 0\' TERM\necho "args: $*"\nwhile true; do sleep 0.1; done\n'
    )
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
    pid = int((tmp_path / "rrm-run.pid").read_text().split()[0])
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)


def alive(pid: int) -> bool:
    """Running (an exited process left unreaped by a container's init counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_stop_leaves_a_reused_pid_alone(tmp_path):
    # the pid file of a finished run names a pid the kernel has since given to another process group
    stranger = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        (tmp_path / "rrm-run.pid").write_text(f"{stranger.pid} 12345\n")  # not its start time
        stop = remote_command(dry_run("stop")[0])
        done = subprocess.run(
            ["bash", "-c", stop],
            capture_output=True,
            text=True,
            timeout=30,
            env={"HOME": str(tmp_path), "PATH": os.environ["PATH"]},
        )
        assert done.returncode == 0 and done.stdout.endswith(": no run going\n")
        time.sleep(0.2)
        assert stranger.poll() is None  # not signalled
    finally:
        stranger.send_signal(signal.SIGKILL)
        stranger.wait()


def test_remote_run_passes_shell_syntax_in_train_arguments_verbatim(tmp_path):
    # `run`'s script for the workers, run here with HOME=tmp_path: a fake rrm-jax writes the arguments it
    # received, NUL-separated; a command substitution, quotes, ;, a newline, a glob and a variable are data
    fake = tmp_path / "rrm-venv" / "bin" / "rrm-jax"
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/bin/bash\nprintf "%s\\0" "$@" > ~/received.part && mv ~/received.part ~/received\n')
    fake.chmod(0o755)
    (tmp_path / "rrm-jax").mkdir()
    tricky = [
        "data.source=$(touch pwned)",
        'name=it\'s "quoted"',
        "a=1; touch pwned",
        "note=two\nlines",
        "b=`touch pwned`",
        "c=$HOME",
        "d=*",
        "e=\\n",
    ]
    start = remote_command(dry_run("run", "--config", "configs/rrm_7b_v5p.yaml", *tricky)[1])
    done = subprocess.run(
        ["bash", "-c", start],
        capture_output=True,
        text=True,
        timeout=30,
        env={"HOME": str(tmp_path), "PATH": os.environ["PATH"]},
    )
    assert done.returncode == 0, done.stderr
    received = tmp_path / "received"
    deadline = time.monotonic() + 10
    while not received.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert received.read_text().split("\0")[:-1] == ["train", "--config", str(tmp_path / "rrm-run.yaml"), *tricky]
    assert not list(tmp_path.rglob("pwned"))
