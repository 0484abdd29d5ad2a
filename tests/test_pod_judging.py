"""`judge`, `eval` and `rank` as a 2-process pod (launch/local_pod.sh) with a tiny real model: byte-identical
outputs to one process, each process sampling only its share of the prompts; a SIGTERM on one process stops
both, and a resume on two processes completes the one-process output.

The model is a random tiny Qwen2 with the test tokenizer, sampled at temperature 0.6, so every output depends
on the seeds and batches of the sampler: equal files mean each prompt got the same batch and seed. judge reads
an HF folder (the folder a 2-process run used to crash on in process 1), eval and rank an rrm-jax checkpoint.
Each run starts fresh interpreters (about 10-20 s each on 2 cores); the runs share one compilation cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from judge_utils import build_test_tokenizer

ROOT = Path(__file__).resolve().parents[1]
LOCAL_POD = ROOT / "launch" / "local_pod.sh"

# Wraps the sampler to log, per process, how many prompts each call sampled; with $PREEMPT_PROCESS_1 set,
# process 1 alone gets a SIGTERM (a preemption) while it samples its first batch.
COUNTING = """
import json, os, signal, sys
import jax
from rrm_jax import cli, generate

sample = generate.sample

def counting_sample(model, prompt_ids, **kwargs):
    with open(os.path.join(os.environ["COUNT_DIR"], f"process-{jax.process_index()}.log"), "a") as f:
        f.write(json.dumps(len(prompt_ids)) + "\\n")
    if os.environ.get("PREEMPT_PROCESS_1") and jax.process_index() == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    return sample(model, prompt_ids, **kwargs)

generate.sample = counting_sample
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torch
    import transformers

    from rrm_jax.model.convert import hf_to_checkpoint

    root = tmp_path_factory.mktemp("pod-judging")
    folder = root / "hf"
    tok = build_test_tokenizer(folder)
    config = transformers.Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(folder)
    hf_to_checkpoint(folder, root / "ckpt")
    (root / "script.py").write_text(COUNTING)
    pairs = [{"query": f"q{k}", "response_1": f"a{k}", "response_2": f"b{k}" * k} for k in range(5)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (root / "eval.jsonl").write_text(
        "".join(
            json.dumps({"prompt": r["query"], "chosen": r["response_1"], "rejected": r["response_2"]}) + "\n"
            for r in pairs
        )
    )
    (root / "questions.jsonl").write_text(
        "".join(
            json.dumps({"query": f"pick {q}", "responses": [f"r{q}{i}" for i in range(4)]}) + "\n" for q in range(3)
        )
    )
    return root


COMMANDS = {
    # 5 pairs, 2 votes, 2 prompts per batch: a plan of 3 batches
    "judge": lambda root: ["judge", "--model", str(root / "hf"), "--input", str(root / "pairs.jsonl")],
    "eval": lambda root: [
        "eval",
        "--model",
        str(root / "ckpt"),
        "--input",
        str(root / "eval.jsonl"),
        "--format",
        "pairs",
    ],
    # 3 questions of 4 candidates: knockout rounds of 6 and 3 matches (3 and 2 batches)
    "rank": lambda root: [
        "rank",
        "--model",
        str(root / "ckpt"),
        "--input",
        str(root / "questions.jsonl"),
        "--strategy",
        "knockout",
    ],
}


def run_pod(
    processes: int,
    command: str,
    root: Path,
    name: str,
    *extra: str,
    preempt_process_1: bool = False,
) -> tuple[str, Path, dict[int, int]]:
    """(stdout, output path, prompts sampled per process) of `command` on `processes` local processes."""
    out, counts = root / f"{name}.out", root / f"{name}.counts{len(extra)}"
    counts.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RRM_JAX_", "XLA_FLAGS"))}
    env.update(
        PYTHONPATH=str(ROOT),
        COUNT_DIR=str(counts),
        JAX_COMPILATION_CACHE_DIR=str(root / "jax-cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        PREEMPT_PROCESS_1="1" if preempt_process_1 else "",
    )
    cmd = [
        str(LOCAL_POD),
        str(processes),
        sys.executable,
        str(root / "script.py"),
        *COMMANDS[command](root),
        "--output",
        str(out),
        "--votes",
        "2",
        "--batch-size",
        "2",
        "--prompts-per-call",
        "2",
        "--max-new-tokens",
        "6",
        *extra,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    per_process = {
        int(p.stem.split("-")[1]): sum(json.loads(line) for line in p.read_text().split()) for p in counts.iterdir()
    }
    return done.stdout + done.stderr, out, per_process


@pytest.fixture(scope="module")
def single_process(setup):
    """command -> (output bytes, prompts sampled) of the one-process run, run once per module."""
    runs = {}

    def get(command):
        if command not in runs:
            _, out, counts = run_pod(1, command, setup, f"{command}-1")
            runs[command] = out.read_bytes(), counts[0]
        return runs[command]

    return get


@pytest.mark.parametrize("command", ["judge", "eval", "rank"])
def test_two_processes_write_what_one_writes_each_sampling_its_share(setup, single_process, command):
    single, total = single_process(command)
    _, out, double_counts = run_pod(2, command, setup, f"{command}-2")
    assert out.read_bytes() == single
    assert sorted(double_counts) == [0, 1] and sum(double_counts.values()) == total
    assert all(0 < n < total for n in double_counts.values())  # each sampled a share, not the whole job


def test_sigterm_on_one_process_stops_both_and_resume_on_two_completes(setup, single_process):
    single, total = single_process("judge")
    log, out, first = run_pod(2, "judge", setup, "judge-preempted", preempt_process_1=True)
    assert "[0] SIGTERM: stopped with 4 pairs finished" in log and "[1] SIGTERM" not in log  # process 0 reports
    assert not out.exists() and first == {0: 2, 1: 2}  # both stopped after round 1 (batches 0 and 1)
    log, out, resumed = run_pod(2, "judge", setup, "judge-preempted", "--resume")
    assert out.read_bytes() == single
    # only the unfinished pair was sampled: process 1, which never reads the partial file, learnt from process 0
    # which pairs were done (with a different list of batches the two would not meet in the same rounds)
    assert sum(resumed.values()) == total - 4
