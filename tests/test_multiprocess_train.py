"""`rrm-jax train` as a pod: 1, 2 and 4 CPU processes through launch/local_pod.sh train the same run.

Every run has 4 devices in all (4x1, 2x2 or 1x4 per process) on the mesh data=2 x fsdp=2, and the
same global batch, so the processes must reproduce the one-process run: the same rollouts, losses,
evaluations and final parameters (within 1e-5). A checkpoint written by 2 processes resumes in 1 and
in 4, and SIGTERM on one host stops every process at the same step. Each run starts fresh
interpreters and compiles everything: the module takes about 11 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rrm_jax import checkpoint
from rrm_jax.rl import trainer

ROOT = Path(__file__).resolve().parents[1]
LOCAL_POD = ROOT / "launch" / "local_pod.sh"
DEVICES = 4
STEPS = 4
SETTINGS = [
    "model.hidden_size=32",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.num_kv_heads=1",
    "model.intermediate_size=64",
    "data.train_size=512",
    "data.heldout=16",
    "warmup.steps=40",
    "warmup.batch_size=32",
    "warmup.lr=1e-2",  # enough format for rewards of both signs
    "rollout.prompts_per_step=16",
    "rollout.samples_per_prompt=4",
    "optimizer.warmup_steps=0",
    "loss.micro_batches=2",
    "eval_every=2",
    "checkpoint_every=2",
    "mesh.data=2",
    "mesh.fsdp=2",
]


def train_pod(processes: int, output_dir: Path, *extra: str, program=("-m", "rrm_jax.cli")) -> str:
    """`rrm-jax train` in `processes` local processes with DEVICES devices in all; -> their output.
    program: what python runs (default the rrm-jax entry point), given `train ...`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RRM_JAX_", "XLA_FLAGS"))}
    # every run of the session shares one compilation cache in pytest's base temp folder, so runs with
    # the same process count reuse compiled programs
    env.update(
        JAX_COMPILATION_CACHE_DIR=str(output_dir.parent.parent / "jax-cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    cmd = [
        str(LOCAL_POD),
        "--devices-per-process",
        str(DEVICES // processes),
        str(processes),
        sys.executable,
        *program,
        "train",
        "--output-dir",
        str(output_dir),
        "--no-progress",
        *extra,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=output_dir.parent)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def metrics(output_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (output_dir / trainer.METRICS).read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in trainer.TIMING_KEYS} for r in rows]


def params(output_dir: Path) -> dict:
    model, _ = checkpoint.load_model(output_dir)
    return {k: np.asarray(v) for k, v in checkpoint.flatten(model.params()).items()}


def assert_same_run(got: Path, want: Path) -> None:
    got_rows, want_rows = metrics(got), metrics(want)
    assert [r["step"] for r in got_rows] == [r["step"] for r in want_rows] == list(range(STEPS + 1))
    for g, w in zip(got_rows, want_rows):
        assert g.keys() == w.keys()
        for key in w:
            assert g[key] == pytest.approx(w[key], abs=1e-5), (g["step"], key)
    got_params, want_params = params(got), params(want)
    for path in want_params:
        np.testing.assert_allclose(got_params[path], want_params[path], atol=1e-5, rtol=0, err_msg=path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process reference and the same run in 2 processes (both STEPS steps)."""
    root = tmp_path_factory.mktemp("pod")
    single, double = root / "single", root / "double"
    train_pod(1, single, *SETTINGS, f"max_steps={STEPS}")
    output = train_pod(2, double, *SETTINGS, f"max_steps={STEPS}")
    return single, double, output


@pytest.mark.parametrize("processes", [2, 4])
def test_several_processes_train_like_one(runs, tmp_path, processes):
    single, double, output = runs
    rewards = [r["reward_mean"] for r in metrics(single) if "reward_mean" in r]
    assert max(rewards) > -1 and min(rewards) < 1  # real learning signal, not a constant reward
    if processes == 2:
        pod = double
    else:
        pod = tmp_path / "quad"
        output = train_pod(processes, pod, *SETTINGS, f"max_steps={STEPS}")
    assert_same_run(pod, single)
    # only process 0 writes and reports
    assert "[0] checkpoint:" in output and "[1] checkpoint:" not in output
    assert len(list((pod / "tb").iterdir())) == 1


@pytest.mark.parametrize("processes", [1, 4])
def test_checkpoint_of_two_processes_resumes_in_1_and_4(runs, tmp_path, processes):
    single, double, _ = runs
    # the 2-process run as it stood after its step-2 checkpoint (later rows are dropped on resume)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in (trainer.RUN_CONFIG, trainer.HELDOUT, trainer.METRICS):
        shutil.copy(double / name, resumed / name)
    shutil.copytree(double / trainer.CHECKPOINTS / "2", resumed / trainer.CHECKPOINTS / "2")
    output = train_pod(processes, resumed, "--resume", f"max_steps={STEPS}")
    assert "resuming" in output
    assert_same_run(resumed, single)


# Process 1 alone is preempted (SIGTERM) after its step-2 metrics; process 0 never gets a signal.
PREEMPT_ONE_PROCESS = """
import os, signal, sys
import jax
from rrm_jax import cli
from rrm_jax.rl import trainer

log = trainer.MetricsLog.log

def log_then_preempt(self, row):
    log(self, row)
    if row["step"] == 2 and jax.process_index() == 1:
        os.kill(os.getpid(), signal.SIGTERM)

trainer.MetricsLog.log = log_then_preempt
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigterm_on_one_host_stops_every_process_at_the_same_step(tmp_path):
    script = tmp_path / "preempt_one.py"
    script.write_text(PREEMPT_ONE_PROCESS)
    run = tmp_path / "run"
    output = train_pod(
        2,
        run,
        *SETTINGS,
        "max_steps=20",
        "checkpoint_every=0",
        "eval_every=0",
        "warmup.steps=2",
        program=(str(script),),
    )
    assert "[0] SIGTERM: saved step 2" in output and "[1] SIGTERM" not in output  # reported by process 0
    assert [p.name for p in (run / trainer.CHECKPOINTS).iterdir() if p.name.isdigit()] == ["2"]
    assert max(r["step"] for r in metrics(run)) == 2
