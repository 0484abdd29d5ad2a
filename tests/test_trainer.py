"""`rrm-jax train`: learning on a trivial rule, exact resume after kill -9, SIGTERM, bad input, sharding."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from flax import nnx
from train_utils import split_flags, train_subprocess

from rrm_jax import checkpoint, cli, parallel
from rrm_jax.model.config import Qwen2Config
from rrm_jax.model.qwen2 import Qwen2
from rrm_jax.rl import step, trainer
from rrm_jax.rl.config import load_config
from rrm_jax.rl.reward import register_reward
from rrm_jax.rrm.prompt import parse_verdict

REPO = Path(__file__).resolve().parents[1]

# A tiny model and batch: the whole pipeline (warm-up, rollout, update, eval, checkpoint) in seconds.
TINY = [
    "model.hidden_size=32",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.num_kv_heads=1",
    "model.intermediate_size=64",
    "data.train_size=512",
    "data.heldout=200",
    "warmup.steps=40",
    "warmup.batch_size=32",
    "warmup.lr=1e-2",
    "rollout.prompts_per_step=16",
    "rollout.samples_per_prompt=4",
    "optimizer.warmup_steps=0",
    "eval_every=3",
    "checkpoint_every=3",
    "mesh.fsdp=1",  # one device: the default fsdp=-1 would shard these tiny runs over conftest's 8 CPU devices
]


@register_reward("test-always-first")
def _always_first(text: str, preferred: int) -> float:
    """A trivial rule: the verdict "Assistant 1" is right whatever the prompt."""
    return 1.0 if parse_verdict(text) == 1 else -1.0


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / trainer.METRICS).read_text().splitlines()]


def _without_timing(rows):
    return [{k: v for k, v in r.items() if k not in trainer.TIMING_KEYS} for r in rows]


def test_grpo_steps_raise_reward_on_trivial_rule(tmp_path):
    config = load_config(
        None,
        TINY
        + [
            "reward=test-always-first",
            "max_steps=6",
            "loss.entropy_coef=0",
            "optimizer.lr=5e-3",
            "eval_every=0",
            "checkpoint_every=0",
        ],
    )
    assert trainer.train(config, tmp_path / "run", progress=False) == 0
    rows = [r for r in _rows(tmp_path / "run") if "reward_mean" in r]
    assert rows[0]["unparseable"] < 0.2  # the warm-up taught the format
    first, last = np.mean([r["reward_mean"] for r in rows[:2]]), np.mean([r["reward_mean"] for r in rows[-2:]])
    assert last > first + 0.4, (first, last)


def _train_subprocess(
    out: Path, *extra: str, crash_after: int | None = None, signum: int = signal.SIGKILL
) -> subprocess.CompletedProcess:
    flags, overrides = split_flags(extra)
    return train_subprocess(
        ["train", "--output-dir", str(out), "--no-progress", *flags, *TINY, *overrides], crash_after, signum
    )


def test_resume_after_kill_is_exact(tmp_path):
    straight = _train_subprocess(tmp_path / "straight", "max_steps=6", "warmup.steps=5")
    assert straight.returncode == 0, straight.stderr
    crashed = _train_subprocess(tmp_path / "resumed", "max_steps=6", "warmup.steps=5", crash_after=4)
    assert crashed.returncode == -signal.SIGKILL
    assert checkpoint.latest_step(tmp_path / "resumed" / trainer.CHECKPOINTS).name == "3"
    resumed = _train_subprocess(tmp_path / "resumed", "max_steps=6", "warmup.steps=5", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr

    assert _without_timing(_rows(tmp_path / "resumed")) == _without_timing(_rows(tmp_path / "straight"))
    a, _ = checkpoint.load_model(tmp_path / "straight")
    b, _ = checkpoint.load_model(tmp_path / "resumed")
    for x, y in zip(jax.tree.leaves(a.params()), jax.tree.leaves(b.params())):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # the printed follow-on commands work on the run folder
    assert checkpoint.load_tokenizer(tmp_path / "resumed") is not None
    assert f"rrm-jax eval --model {tmp_path / 'resumed'}" in resumed.stdout
    # `make demo` a second time: --resume on a finished run says so and prints the summary again
    again = _train_subprocess(tmp_path / "resumed", "max_steps=6", "warmup.steps=5", "--resume")
    assert again.returncode == 0, again.stderr
    assert "already trained to step 6" in again.stderr and "checkpoint:" in again.stdout
    assert _without_timing(_rows(tmp_path / "resumed")) == _without_timing(_rows(tmp_path / "straight"))


def test_sigterm_saves_current_step_and_exits_zero(tmp_path, monkeypatch):
    log = trainer.MetricsLog.log

    def log_then_preempt(self, row):
        log(self, row)
        if row["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer.MetricsLog, "log", log_then_preempt)
    out = tmp_path / "run"
    config = load_config(None, TINY + ["max_steps=10", "checkpoint_every=0", "eval_every=0", "warmup.steps=2"])
    assert trainer.train(config, out, progress=False) == 0
    assert [p.name for p in (out / trainer.CHECKPOINTS).iterdir() if p.name.isdigit()] == ["2"]
    assert max(r["step"] for r in _rows(out)) == 2
    model, _ = checkpoint.load_model(out)  # the saved step is a loadable model checkpoint
    assert model.config.hidden_size == 32


def test_ctrl_c_saves_the_step_in_flight_exits_130_and_resume_continues(tmp_path, capsys):
    out = tmp_path / "run"
    short = ["max_steps=4", "checkpoint_every=0", "eval_every=0", "warmup.steps=0", "guard.truncation_warning=0"]
    stopped = _train_subprocess(out, *short, crash_after=2, signum=signal.SIGINT)
    assert stopped.returncode == 130, stopped.stderr
    assert stopped.stderr.strip() == f"SIGINT: saved step 2 to {out / trainer.CHECKPOINTS / '2'}; resume with --resume"
    assert max(r["step"] for r in _rows(out)) == 2
    argv = ["train", "--output-dir", str(out), "--resume", "--no-progress", *TINY, *short]
    assert cli.main(argv) == 0
    assert "resuming" in capsys.readouterr().err
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4]


def _cli_error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rrm-jax: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    def base(name):  # flags first, then the key=value overrides
        return ["train", "--no-progress", "--output-dir", str(tmp_path / name), "warmup.steps=0", *TINY[:5]]

    err = _cli_error(capsys, base("a") + ["max_stepz=3"])
    assert err.endswith("unknown config key 'max_stepz' in the command line; did you mean max_steps?")

    err = _cli_error(capsys, base("b") + ["mesh.data=3"])
    assert "data=3" in err and f"{jax.device_count()} devices" in err

    bad = tmp_path / "prefs.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"}\n')
    err = _cli_error(capsys, base("c") + [f"data.source={bad}", "data.heldout=0.5", "loss.entropy_on=completion"])
    assert f"{bad} line 2:" in err

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    err = _cli_error(capsys, base("d") + [f"data.source={empty}", "loss.entropy_on=completion"])
    assert str(empty) in err and err.endswith(": no rows")  # the one wording of every row reader (data.rows)

    err = _cli_error(capsys, ["train", "--config", str(tmp_path / "missing.yaml"), "--output-dir", str(tmp_path / "e")])
    assert "missing.yaml" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished run with one checkpoint (max_steps=0: the initial model), built once; tests that may
    write to it take a copy."""
    out = tmp_path_factory.mktemp("finished") / "run"
    config = load_config(None, TINY + ["max_steps=0", "warmup.steps=0", "eval_every=0"])
    assert trainer.train(config, out, progress=False) == 0
    return out


def _run_files(out: Path) -> dict:
    return {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "extra, named",
    [
        # the cases: a policy config on a judge run, a model shape, a seed (which would redraw heldout.jsonl)
        (
            [f"--config={REPO / 'rrm_jax/configs/toy_policy.yaml'}", "reward.judge={run}"],
            "reward.type: 'rrm' saved, 'judge' given",
        ),
        (["model.hidden_size=64", "max_steps=410"], "model.hidden_size: 32 saved, 64 given"),
        (["seed=5"], "seed: 0 saved, 5 given"),
    ],
)
def test_resume_that_changes_the_run_is_refused_and_writes_nothing(finished_run, capsys, extra, named):
    before = _run_files(finished_run)
    extra = [e.format(run=finished_run) for e in extra]
    err = _cli_error(capsys, ["train", "--output-dir", str(finished_run), "--resume", "--no-progress", *extra])
    assert named in err and "--resume may change only max_steps" in err
    assert "max_steps:" not in err  # an allowed change is not reported
    assert _run_files(finished_run) == before


def test_resume_may_change_the_cadence_and_keeps_the_heldout_set(finished_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    kept = (out / trainer.HELDOUT).read_text().splitlines(keepends=True)[0]
    (out / trainer.HELDOUT).write_text(kept)  # regenerating it would bring the other rows back
    # the same config again, from a --config file plus overrides as `make demo-policy` passes it, with allowed changes
    same = [f"--config={REPO / 'rrm_jax/configs/toy.yaml'}", *TINY, "max_steps=0", "warmup.steps=0", "eval_every=0"]
    argv = [
        "train",
        "--output-dir",
        str(out),
        "--resume",
        "--no-progress",
        *same,
        "checkpoint_every=7",
        "guard.on_collapse=rollback",
        "keep_checkpoints=2",
    ]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert (out / trainer.HELDOUT).read_text() == kept
    saved = load_config(base=yaml.safe_load((out / trainer.RUN_CONFIG).read_text()))
    assert (saved.checkpoint_every, saved.guard.on_collapse, saved.keep_checkpoints) == (7, "rollback", 2)


def test_relative_output_and_export_folders(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [
        "train",
        "--output-dir",
        "runs/rel",
        "--export-hf",
        "export/rel",
        "--no-progress",
        *TINY,
        "max_steps=0",
        "warmup.steps=0",
        "eval_every=0",
    ]
    assert cli.main(argv) == 0, capsys.readouterr().err
    model, config = checkpoint.load_model("runs/rel")
    exported, exported_config = checkpoint.load_model("export/rel")
    assert exported_config.hidden_size == config.hidden_size == 32
    for x, y in zip(jax.tree.leaves(model.params()), jax.tree.leaves(exported.params())):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _sharded_step(mesh, config, params, batch, optimizer, loss):
    if mesh is not None:
        model = Qwen2(config, rngs=nnx.Rngs(0))
        shardings = parallel.param_shardings(model, mesh)
        params = jax.device_put(params, shardings)
        batch = jax.device_put(batch, parallel.logical_sharding(("batch",), mesh))
    params = jax.tree.map(jnp.copy, params)
    opt_state = optimizer.init(params)
    new_params, _, metrics = step.update_fn(config, loss, optimizer, 2, params, opt_state, batch)
    return jax.device_get(new_params), jax.device_get(metrics)


@pytest.mark.parametrize("shape", [(1, 8, 1), (1, 2, 4)])
def test_sharded_update_equals_single_device(shape):
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=4,
        num_kv_heads=4,
        tie_word_embeddings=False,
        max_position_embeddings=64,
    )
    params = Qwen2(config, rngs=nnx.Rngs(1)).params()
    rng = np.random.default_rng(0)
    P, G, Tp, Tc = 8, 2, 8, 6
    prompt_tokens = jnp.asarray(rng.integers(0, 64, (P, Tp)), jnp.int32)
    prompt_lengths = jnp.asarray(rng.integers(3, Tp + 1, P), jnp.int32)
    tokens = jnp.asarray(rng.integers(0, 64, (P * G, Tc)), jnp.int32)
    loss_mask = jnp.asarray(np.arange(Tc)[None] < rng.integers(2, Tc + 1, (P * G, 1)), jnp.float32)
    old = step.logprobs_fn(config, params, prompt_tokens, prompt_lengths, tokens)
    old = old + jnp.asarray(rng.normal(0, 0.1, old.shape), jnp.float32)
    batch = step.RolloutBatch(
        prompt_tokens,
        prompt_lengths,
        tokens,
        loss_mask,
        old,
        old - 0.05,
        jnp.asarray(rng.normal(size=P * G), jnp.float32),
        loss_mask,
    )
    # plain SGD: the update is the gradient itself (Adam would blow float noise in near-zero gradients up to lr)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))
    loss = step.LossSettings(kl_coef=0.1, entropy_coef=0.05)
    expected, expected_metrics = _sharded_step(None, config, params, batch, optimizer, loss)
    got, got_metrics = _sharded_step(parallel.make_mesh(*shape), config, params, batch, optimizer, loss)
    for path, x in checkpoint.flatten(expected).items():
        np.testing.assert_allclose(checkpoint.flatten(got)[path], x, atol=1e-5, err_msg=path)
    for key, value in expected_metrics.items():
        np.testing.assert_allclose(got_metrics[key], value, atol=1e-5, rtol=1e-5, err_msg=key)


def test_progress_bar_keeps_the_latest_eval_on_every_frame(tmp_path, capsys):
    config = load_config(None, TINY + ["max_steps=4", "warmup.steps=5", "eval_every=2", "checkpoint_every=0"])
    assert trainer.train(config, tmp_path / "run", progress=True) == 0
    frames = [f for f in re.split(r"[\r\n]", capsys.readouterr().err) if re.search(r" [1-4]/4 ", f)]
    assert {int(re.search(r" (\d)/4 ", f).group(1)) for f in frames} >= {1, 4}
    for f in frames:  # the step-0 evaluation's figure from the first frame on, then the latest one
        assert re.search(r"reward=-?\d\.\d\d, acc=\d\.\d\d, eval=\d\.\d{3}", f), f


def _metrics_lines(*steps: int) -> str:
    return "".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in steps)


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path):
    """A crash in the middle of a metrics write leaves a last line without its newline: the resume
    drops it (with the rows after the restored step) instead of dying on it."""
    (tmp_path / trainer.METRICS).write_text(_metrics_lines(1, 2, 3) + '{"step": 4, "lo')
    log = trainer.MetricsLog(tmp_path, resume_step=3)
    assert log.rows() == [{"step": 1, "loss": 0.1}, {"step": 2, "loss": 0.2}, {"step": 3, "loss": 0.3}]
    log.log({"step": 4, "loss": 0.4})
    log.close()
    assert (tmp_path / trainer.METRICS).read_text() == _metrics_lines(1, 2, 3, 4)


def test_a_damaged_metrics_line_before_the_last_is_one_line_exit_2(finished_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    damaged = _metrics_lines(0) + '{"step": 1, "lo\n' + _metrics_lines(2)
    (out / trainer.METRICS).write_text(damaged)
    err = _cli_error(
        capsys,
        [
            "train",
            "--output-dir",
            str(out),
            "--resume",
            "--no-progress",
            *TINY,
            "max_steps=0",
            "warmup.steps=0",
            "eval_every=0",
        ],
    )
    assert err == (
        f"rrm-jax: error: {out / trainer.METRICS} line 2 is not valid JSON (not a cut-short last line: "
        f"the file is damaged); repair or delete that line, then --resume again"
    )
    assert (out / trainer.METRICS).read_text() == damaged  # nothing rewritten


def test_config_yaml_is_written_whole(finished_run, tmp_path, monkeypatch):
    """A crash while config.yaml is written leaves the previous one whole (a file cut short would fill
    its missing sections with defaults on the next --resume): it is written beside and renamed."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = (out / trainer.RUN_CONFIG).read_bytes()
    replace = os.replace

    def crash_before_config_lands(src, dst):
        if Path(dst).name == trainer.RUN_CONFIG:
            raise KeyboardInterrupt  # kill -9 between the write and its rename
        replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_before_config_lands)
    more_steps = load_config(base=yaml.safe_load(before), overrides=["max_steps=9"])
    with pytest.raises(KeyboardInterrupt):
        trainer._prepare_output(out, True, more_steps, task=None)  # a resume keeps heldout.jsonl: no task needed
    assert (out / trainer.RUN_CONFIG).read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in finished_run.iterdir())  # no temp file left
    monkeypatch.setattr(os, "replace", replace)
    trainer._prepare_output(out, True, more_steps, task=None)
    assert load_config(base=yaml.safe_load((out / trainer.RUN_CONFIG).read_text())).max_steps == 9
