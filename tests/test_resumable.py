"""Resumable outputs of `judge`, `eval`, `rank` and `generate`: SIGTERM, Ctrl-C, kill -9, a cut-short partial file, a partial file
from other settings, and the mode of the files written. The model is the seeded stand-in of judge_utils, whose
outputs change with the seed and the batch of every prompt, so a resumed run equals an uninterrupted one only
if every batch is replayed exactly."""

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from judge_utils import SeededGenerate, build_test_tokenizer

from rrm_jax import cli
from rrm_jax.rrm import judge as judge_module

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
# 6 pairs of different lengths: with --prompts-per-call 2 the plan has 3 batches (one sampler call each)
PAIRS = [
    {"id": k, "query": f"question {k}" + "?" * (3 * k), "response_1": f"good {k}", "response_2": f"poor {k}"}
    for k in range(6)
]
QUESTIONS = [
    {
        "query": f"pick one {q}",
        "responses": [f"answer {q}.{r}" + "!" * r for r in range(4)],
        "correct": [r == 2 for r in range(4)],
    }
    for q in range(3)
]
COMMON = ["--model", "M", "--votes", "2", "--batch-size", "2", "--prompts-per-call", "2"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_test_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def files(tmp_path):
    pairs, questions = tmp_path / "pairs.jsonl", tmp_path / "questions.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    questions.write_text("".join(json.dumps(r) + "\n" for r in QUESTIONS))
    evals = tmp_path / "eval.jsonl"
    evals.write_text(
        "".join(
            json.dumps({"prompt": r["query"], "chosen": r["response_1"], "rejected": r["response_2"]}) + "\n"
            for r in PAIRS
        )
    )
    return {"judge": pairs, "eval": evals, "rank": questions}


def argv(command, files, out, *extra):
    specific = {"judge": [], "eval": ["--format", "pairs"], "rank": ["--strategy", "knockout"]}[command]
    return [command, "--input", str(files[command]), "--output", str(out), *COMMON, *specific, *extra]


@pytest.fixture
def run(monkeypatch, tokenizer, capsys):
    """run(args, on_call=None) -> (exit code, stderr, the SeededGenerate used): one command, in this process."""

    def go(args, on_call=None):
        generate = SeededGenerate(tokenizer, on_call)
        monkeypatch.setattr(judge_module, "load_backend", lambda path, **options: (generate, tokenizer))
        code = cli.main(list(args))
        return code, capsys.readouterr().err, generate

    return go


def records(partial: Path) -> list[dict]:
    return [json.loads(line) for line in partial.read_text().splitlines()]


def sigterm_on_call(n, signum=signal.SIGTERM):
    def on_call(call):
        if call == n:
            os.kill(os.getpid(), signum)  # a preemption (or Ctrl-C) arriving while batch n is being sampled

    return on_call


# SIGTERM (a preemption) exits 0; Ctrl-C exits 130, as the shell reports a command it interrupted
STOPS = [pytest.param(signal.SIGTERM, 0, id="SIGTERM"), pytest.param(signal.SIGINT, 130, id="SIGINT")]


@pytest.mark.parametrize("signum, exit_code", STOPS)
@pytest.mark.parametrize("command", ["judge", "eval", "rank"])
def test_a_stop_signal_ends_after_the_batch_in_flight_and_resume_completes(
    run, files, tmp_path, command, signum, exit_code
):
    reference, out = tmp_path / "reference", tmp_path / "out"
    code, _, uninterrupted = run(argv(command, files, reference))
    assert code == 0

    code, err, first = run(argv(command, files, out), on_call=sigterm_on_call(2, signum))
    last = err.splitlines()[-1]  # after the progress bar
    assert code == exit_code and last.startswith(f"{signal.Signals(signum).name}: stopped with 4 ")
    assert "--resume" in last and "Traceback" not in err
    assert not out.exists() and len(first.calls) == 2  # the batch in flight was finished, no later one started
    header, *done = records(Path(f"{out}.partial"))
    assert header["command"] == command and header["settings"]["votes"] == 2
    assert len(done) == 4 and all(len(r["texts"]) == 2 for r in done)  # 2 batches of 2 comparisons, 2 votes each

    code, _, resumed = run(argv(command, files, out, "--resume"))
    assert code == 0 and out.read_bytes() == reference.read_bytes()
    assert not Path(f"{out}.partial").exists()
    finished = [p for call in first.calls for p in call["prompt_ids"]]
    assert len(resumed.prompts_sampled) == len(uninterrupted.prompts_sampled) - len(finished)
    assert not any(p in finished for p in resumed.prompts_sampled)  # nothing finished was sampled again


def test_a_second_ctrl_c_quits_at_once_in_one_line(run, files, tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert run(argv("judge", files, reference))[0] == 0

    def ctrl_c_twice(call):
        if call == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # an impatient user: no waiting for the batch in flight

    code, err, _ = run(argv("judge", files, out), on_call=ctrl_c_twice)
    assert code == 130 and err.splitlines()[-1] == "rrm-jax: interrupted (Ctrl-C)" and "Traceback" not in err
    header, *done = records(Path(f"{out}.partial"))
    assert len(done) == 2  # batch 0; the batch in flight was lost
    assert run(argv("judge", files, out, "--resume"))[0] == 0 and out.read_bytes() == reference.read_bytes()


KILL_AT_CALL = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from transformers import AutoTokenizer
from judge_utils import SeededGenerate
from rrm_jax import cli
from rrm_jax.rrm import judge

tokenizer = AutoTokenizer.from_pretrained({tokenizer!r})

def kill(call):
    if call == {kill_at}:
        os.kill(os.getpid(), {signum})  # SIGKILL: no chance to clean up, exactly like kill -9

generate = SeededGenerate(tokenizer, kill)
judge.load_backend = lambda path, **options: (generate, tokenizer)
sys.exit(cli.main(sys.argv[1:]))
"""


# kill -9 loses the batch in flight; Ctrl-C lets it finish, exits 130 with one line and no traceback
@pytest.mark.parametrize(
    "signum, returncode, finished_batches",
    [pytest.param(signal.SIGKILL, -signal.SIGKILL, 1, id="SIGKILL"), pytest.param(signal.SIGINT, 130, 2, id="SIGINT")],
)
def test_a_judge_process_killed_or_interrupted_then_resumed_equals_an_uninterrupted_run(
    run, files, tmp_path, tokenizer, signum, returncode, finished_batches
):
    reference, out = tmp_path / "reference.jsonl", tmp_path / "out.jsonl"
    assert run(argv("judge", files, reference))[0] == 0
    tokenizer.save_pretrained(tmp_path / "tok")
    script = tmp_path / "kill.py"
    script.write_text(
        KILL_AT_CALL.format(tests=str(TESTS), tokenizer=str(tmp_path / "tok"), kill_at=2, signum=int(signum))
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(script), *argv("judge", files, out)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == returncode, done.stderr
    if signum == signal.SIGINT:
        assert (
            done.stderr.splitlines()[-1].startswith("SIGINT: stopped with 4 pairs") and "Traceback" not in done.stderr
        )
    assert not out.exists()
    header, *finished = records(Path(f"{out}.partial"))
    assert len(finished) == 2 * finished_batches  # SIGKILL: batch 0 was written, batch 1 died in flight

    code, err, resumed = run(argv("judge", files, out, "--resume"))
    assert code == 0 and out.read_bytes() == reference.read_bytes()
    # the comparisons not finished were sampled (2 prompts per batch), the finished ones were not
    assert len(resumed.prompts_sampled) == 6 - len(finished)
    done_queries = {PAIRS[r["index"]]["query"] for r in finished}
    sampled = [tokenizer.decode(p) for p in resumed.prompts_sampled]
    assert not any(q in text for q in done_queries for text in sampled)


def test_cut_short_last_line_is_dropped_on_resume(run, files, tmp_path):
    reference, out = tmp_path / "reference.jsonl", tmp_path / "out.jsonl"
    assert run(argv("judge", files, reference))[0] == 0
    assert run(argv("judge", files, out), on_call=sigterm_on_call(2))[0] == 0
    partial = Path(f"{out}.partial")
    data = partial.read_bytes()
    partial.write_bytes(data[: len(data) - 40])  # the last record's write was cut short by a kill
    code, _, resumed = run(argv("judge", files, out, "--resume"))
    assert code == 0 and out.read_bytes() == reference.read_bytes()
    assert len(resumed.prompts_sampled) == 4  # the batch of the cut record again, and the batch never started


def test_a_damaged_line_before_the_last_is_refused(run, files, tmp_path):
    out = tmp_path / "out.jsonl"
    assert run(argv("judge", files, out), on_call=sigterm_on_call(2))[0] == 0
    partial = Path(f"{out}.partial")
    lines = partial.read_text().splitlines(keepends=True)
    lines[1] = lines[1][:20] + "\n"
    partial.write_text("".join(lines))
    code, err, generate = run(argv("judge", files, out, "--resume"))
    assert code == 2 and err.count("\n") == 1 and "line 2 is not valid JSON" in err and generate.calls == []


@pytest.mark.parametrize(
    "change, message",
    [
        (["--votes", "3"], "votes=2 there, 3 here"),
        (["--seed", "5"], "seed=0 there, 5 here"),
        (["--temperature", "0.9"], "temperature=0.6 there, 0.9 here"),
    ],
)
def test_partial_from_other_settings_is_refused_in_one_line(run, files, tmp_path, change, message):
    out = tmp_path / "out.jsonl"
    assert run(argv("judge", files, out), on_call=sigterm_on_call(1))[0] == 0
    before = Path(f"{out}.partial").read_bytes()
    code, err, generate = run(argv("judge", files, out, "--resume", *change))
    assert code == 2 and err.startswith("rrm-jax: error: ") and err.count("\n") == 1
    assert "other settings" in err and message in err and generate.calls == []
    assert Path(f"{out}.partial").read_bytes() == before and not out.exists()


def test_partial_of_another_input_or_without_resume_is_refused(run, files, tmp_path):
    out = tmp_path / "out.jsonl"
    assert run(argv("judge", files, out), on_call=sigterm_on_call(1))[0] == 0
    code, err, _ = run(argv("judge", files, out))  # no --resume: never overwrite finished work
    assert code == 2 and "pass --resume" in err and err.count("\n") == 1
    files["judge"].write_text("".join(json.dumps({**r, "response_2": "edited"}) + "\n" for r in PAIRS))
    code, err, generate = run(argv("judge", files, out, "--resume"))  # same file name, other rows
    assert code == 2 and "input_rows_sha256=" in err and err.count("\n") == 1 and generate.calls == []


@pytest.mark.parametrize("command", ["judge", "eval", "rank"])
def test_outputs_get_the_umask_mode(run, files, tmp_path, command):
    out = tmp_path / "out"
    previous = os.umask(0o027)
    try:
        assert run(argv(command, files, out))[0] == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", *(p.name for p in files.values())])


@pytest.mark.parametrize("command", ["judge", "eval", "rank"])
def test_an_existing_output_is_never_replaced(run, files, tmp_path, command):
    out = tmp_path / "out"
    assert run(argv(command, files, out))[0] == 0
    before = out.read_bytes()
    for extra in ([], ["--resume"]):
        code, err, generate = run(argv(command, files, out, *extra))
        assert code == 2 and err == f"rrm-jax: error: output {out} already exists; choose a new path or remove it\n"
        assert generate.calls == [] and out.read_bytes() == before and not Path(f"{out}.partial").exists()


# --- the model of a resume: a run folder loads its newest step, so the step is recorded and compared ---


def fake_step(run_dir: Path, step: int, commit_time: int = 1) -> Path:
    """A checkpoint step as far as resolving and identifying it goes (the backend is a stand-in)."""
    from rrm_jax.model.config import Qwen2Config

    folder = run_dir / "checkpoints" / str(step)
    (folder / "params").mkdir(parents=True)
    (folder / "model_config").mkdir()
    (folder / "model_config" / "metadata").write_text(
        json.dumps(
            Qwen2Config(
                vocab_size=262, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=1
            ).to_dict()
        )
    )
    (folder / "_CHECKPOINT_METADATA").write_text(json.dumps({"commit_timestamp_nsecs": commit_time}))
    return folder


@pytest.fixture
def run_loading(monkeypatch, tokenizer, capsys):
    """Like `run`, and also returns the paths the backend was asked to load."""

    def go(args, on_call=None):
        generate, loaded = SeededGenerate(tokenizer, on_call), []
        monkeypatch.setattr(
            judge_module, "load_backend", lambda path, **options: loaded.append(path) or (generate, tokenizer)
        )
        code = cli.main(list(args))
        return code, capsys.readouterr().err, generate, loaded

    return go


def with_model(args: list[str], model) -> list[str]:
    return [str(model) if a == "M" else a for a in args]


@pytest.mark.parametrize("command", ["judge", "eval", "rank"])
def test_a_resume_refuses_a_run_folder_that_moved_on_to_a_newer_step(run_loading, files, tmp_path, command):
    run_dir, out, reference = tmp_path / "run", tmp_path / "out", tmp_path / "reference"
    step_1 = fake_step(run_dir, 1)
    assert run_loading(with_model(argv(command, files, reference), step_1))[0] == 0
    code, _, _, loaded = run_loading(with_model(argv(command, files, out), run_dir), on_call=sigterm_on_call(2))
    assert code == 0 and loaded == [str(step_1)]  # the step resolved when the partial file was opened
    header = records(Path(f"{out}.partial"))[0]
    assert header["model_loaded"]["path"] == str(step_1) and len(header["model_loaded"]["config_sha256"]) == 64
    before = Path(f"{out}.partial").read_bytes()

    step_2 = fake_step(run_dir, 2)  # training went on
    code, err, generate, loaded = run_loading(with_model(argv(command, files, out, "--resume"), run_dir))
    assert code == 2 and err.count("\n") == 1 and generate.calls == [] and loaded == []
    assert f"holds results of {step_1} (config sha256 " in err and f"--model now loads {step_2} (config sha256" in err
    assert f"resume with --model {step_1}" in err
    assert Path(f"{out}.partial").read_bytes() == before and not out.exists()

    # the step it recorded, named directly, finishes the job: the same model reached another way
    code, err, _, loaded = run_loading(with_model(argv(command, files, out, "--resume"), step_1))
    assert code == 0 and loaded == [str(step_1)] and out.read_bytes() == reference.read_bytes()


def test_a_resume_refuses_a_step_written_again(run_loading, files, tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    step = fake_step(run_dir, 1)
    assert run_loading(with_model(argv("judge", files, out), run_dir), on_call=sigterm_on_call(1))[0] == 0
    (step / "_CHECKPOINT_METADATA").write_text(json.dumps({"commit_timestamp_nsecs": 2}))  # e.g. a restarted run
    code, err, generate, _ = run_loading(with_model(argv("judge", files, out, "--resume"), run_dir))
    assert code == 2 and err.count("\n") == 1 and generate.calls == []
    assert f"holds results of {step} (config sha256 " in err and f"--model now loads {step} (config sha256" in err


def test_a_resume_with_another_model_path_names_both(run, files, tmp_path):
    out = tmp_path / "out.jsonl"
    assert run(argv("judge", files, out), on_call=sigterm_on_call(1))[0] == 0
    code, err, generate = run(argv("judge", files, out, "--resume", "--model", "other"))
    assert code == 2 and err.count("\n") == 1 and generate.calls == []
    assert "holds results of M (config sha256 unknown) but --model now loads other (config sha256 unknown)" in err


def test_a_partial_file_of_an_older_rrm_jax_resumes_with_a_note(run, files, tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert run(argv("judge", files, reference))[0] == 0
    assert run(argv("judge", files, out), on_call=sigterm_on_call(2))[0] == 0
    partial = Path(f"{out}.partial")
    header, *rest = partial.read_text().splitlines(keepends=True)
    older = {k: v for k, v in json.loads(header).items() if k != "model_loaded"}
    partial.write_text(json.dumps(older) + "\n" + "".join(rest))

    code, err, _ = run(argv("judge", files, out, "--resume", "--model", "other"))  # its settings still compare the path
    assert code == 2 and "model='M' there, 'other' here" in err and err.count("\n") == 1
    code, err, resumed = run(argv("judge", files, out, "--resume"))
    assert code == 0 and out.read_bytes() == reference.read_bytes() and len(resumed.prompts_sampled) == 2
    assert "did not record which checkpoint it loaded" in err
