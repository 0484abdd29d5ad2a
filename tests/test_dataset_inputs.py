"""Hugging Face datasets as inputs of judge, eval, rank, generate and train: folders written by save_to_disk
(no network), a hub name served from a fake entry in a temporary HF cache (offline), and missing columns."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
from judge_utils import SeededGenerate, build_test_tokenizer

from rrm_jax import cli
from rrm_jax.data import sources
from rrm_jax.data.preference import read_preferences
from rrm_jax.errors import UserError
from rrm_jax.generate_cli import read_prompt_rows
from rrm_jax.rl import judge_task
from rrm_jax.rl.config import load_config
from rrm_jax.rrm import judge as judge_module

ROOT = Path(__file__).resolve().parents[1]
datasets.disable_progress_bars()  # save_to_disk's bars would land in the stderr the tests read
PAIRS = [{"id": k, "query": f"question {k}", "response_1": f"good {k}", "response_2": f"poor {k}"} for k in range(5)]
BENCH = [
    {"prompt": f"q{k}", "chosen": f"good {k}", "rejected": f"poor {k}", "subset": "llmbar-natural"} for k in range(6)
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_test_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def run(monkeypatch, tokenizer, capsys):
    def go(args):
        generate = SeededGenerate(tokenizer)
        monkeypatch.setattr(judge_module, "load_backend", lambda path, **options: (generate, tokenizer))
        return cli.main(list(args)), capsys.readouterr().err, generate

    return go


def saved(path: Path, rows=None, **splits) -> Path:
    data = (
        datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})
        if splits
        else datasets.Dataset.from_list(rows)
    )
    data.save_to_disk(str(path))
    return path


def test_judge_reads_a_saved_dataset_like_the_same_rows_in_a_file(run, tmp_path):
    folder = saved(tmp_path / "pairs-ds", PAIRS)
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    outs = []
    for source in (jsonl, folder):
        out = tmp_path / f"{source.name}.out"
        code, err, _ = run(["judge", "--model", "M", "--input", str(source), "--output", str(out), "--votes", "2"])
        assert code == 0, err
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] and len(outs[0].splitlines()) == 5


def test_eval_picks_the_split_of_a_saved_dataset_dict(run, tmp_path):
    folder = saved(tmp_path / "bench", raw=BENCH, filtered=BENCH[:4])
    out = tmp_path / "results.json"
    base = ["eval", "--model", "M", "--input", str(folder), "--format", "rewardbench", "--output", str(out)]
    code, err, _ = run(base)
    assert code == 2 and "has the splits raw, filtered; choose one with --dataset-split" in err and err.count("\n") == 1
    code, err, generate = run(base + ["--dataset-split", "filtered"])
    assert code == 0, err
    results = json.loads(out.read_text())
    assert results["items"] == 4 and len(generate.prompts_sampled) == 4
    assert list(results["metrics"]["subsets"]) == ["llmbar-natural"]


def test_rank_reads_list_columns(run, tmp_path):
    rows = [
        {"query": f"q{q}", "responses": [f"r{q}{i}" for i in range(3)], "correct": [i == 1 for i in range(3)]}
        for q in range(2)
    ]
    folder = saved(tmp_path / "cands", rows)
    out = tmp_path / "picks.jsonl"
    code, err, _ = run(["rank", "--model", "M", "--input", str(folder), "--output", str(out), "--strategy", "elo"])
    assert code == 0, err
    picks = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["query"] for p in picks] == ["q0", "q1"] and all(len(p["ratings"]) == 3 for p in picks)


@pytest.mark.parametrize(
    "command, rows, message",
    [
        (
            ["eval", "--format", "rewardbench"],
            [{k: v for k, v in r.items() if k != "subset"} for r in BENCH],
            "missing column 'subset'",
        ),
        (["judge"], [{"query": "q", "response_1": "a"}], "missing column 'response_2'"),
        (["rank", "--strategy", "elo"], [{"query": "q", "answers": ["a", "b"]}], "missing column 'responses'"),
    ],
)
def test_missing_columns_name_the_column_and_the_dataset(run, tmp_path, command, rows, message):
    folder = saved(tmp_path / "ds", rows)
    out = tmp_path / "out"
    code, err, generate = run([command[0], "--model", "M", "--input", str(folder), "--output", str(out), *command[1:]])
    assert code == 2 and err.count("\n") == 1 and message in err and str(folder) in err
    assert generate.calls == [] and not out.exists() and not Path(f"{out}.partial").exists()


def test_generate_and_train_read_datasets(tmp_path):
    prompts = saved(tmp_path / "prompts", [{"prompt": "hello", "tag": 1}, {"prompt": "world", "tag": 2}])
    assert read_prompt_rows(str(prompts)) == [{"prompt": "hello", "tag": 1}, {"prompt": "world", "tag": 2}]
    with pytest.raises(UserError, match="missing column 'prompt'"):
        read_prompt_rows(str(saved(tmp_path / "no-prompt", [{"text": "x"}])))

    labelled = [{"query": f"q{k}", "response_1": f"a{k}", "response_2": f"b{k}", "label": 2} for k in range(6)]
    folder = saved(tmp_path / "prefs", train=labelled)
    pairs = read_preferences(str(folder))
    assert [(p.query, p.chosen, p.rejected) for p in pairs] == [(f"q{k}", f"b{k}", f"a{k}") for k in range(6)]
    assert pairs[0].origin.endswith("row 1")
    config = load_config(
        None, [f"data.source={folder}", "data.dataset_split=train", "data.heldout=2", "warmup.steps=0"]
    )
    train, heldout, _ = judge_task.load_pairs(config)
    assert (len(train), len(heldout)) == (4, 2)
    with pytest.raises(UserError, match="missing column 'label'"):
        read_preferences(str(saved(tmp_path / "bad-prefs", [{"query": "q", "response_1": "a", "response_2": "b"}])))


# A fake entry of the local HF datasets cache, laid out as `datasets` stores a downloaded hub dataset:
# HF_HOME/datasets/<owner>___<name>/<config>/<version>/<hash>/{dataset_info.json, <name>-<split>.arrow}
def fake_cache_entry(hf_home: Path, repo: str, splits: dict[str, list[dict]], config: str = "default") -> None:
    owner, name = repo.split("/")
    entry = hf_home / "datasets" / f"{owner}___{name}" / config / "0.0.0" / "0123456789abcdef"
    entry.mkdir(parents=True)
    infos = {}
    for split, rows in splits.items():
        staged = hf_home / f"staged-{split}"
        datasets.Dataset.from_list(rows).save_to_disk(str(staged))
        shutil.copy(staged / "data-00000-of-00001.arrow", entry / f"{name}-{split}.arrow")
        infos[split] = datasets.SplitInfo(name=split, num_examples=len(rows), dataset_name=name)
    info = datasets.Dataset.from_list(next(iter(splits.values()))).info.copy()
    info.config_name, info.dataset_name, info.splits = config, name, datasets.SplitDict(infos)
    info.write_to_directory(str(entry))


OFFLINE_READ = """
import json, sys
from rrm_jax.errors import UserError
from rrm_jax.eval import read_items
try:
    items = read_items(sys.argv[1], "rewardbench", dataset_split=sys.argv[2] or None)
    print(json.dumps([it.comparison.query for it in items]))
except UserError as e:
    print("error:", e)
"""


def test_hub_name_loads_offline_from_the_local_cache(tmp_path):
    hf_home = tmp_path / "hf"
    fake_cache_entry(hf_home, "someone/reward-mini", {"raw": BENCH, "filtered": BENCH[:3]})
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HOME": str(hf_home),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
    }

    def read(name, split):
        done = subprocess.run(
            [sys.executable, "-c", OFFLINE_READ, name, split], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]

    assert json.loads(read("someone/reward-mini", "filtered")) == ["q0", "q1", "q2"]
    assert read("someone/reward-mini", "test").startswith(
        'error: someone/reward-mini (split test): Unknown split "test"'
    )
    missing = read("someone/not-cached", "filtered")
    assert missing.startswith("error: someone/not-cached: no such file or folder, and no dataset of that name")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_hub_reads_the_cache_and_fails_fast_without_offline_mode(tmp_path):
    # no HF_*_OFFLINE: the short connection check finds the Hub (here a closed local port) unreachable, so the
    # cache answers at once instead of `datasets` retrying for half a minute
    hf_home = tmp_path / "hf"
    fake_cache_entry(hf_home, "someone/reward-mini", {"filtered": BENCH[:3]})
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "TRANSFORMERS_OFFLINE"}
    endpoint = f"http://127.0.0.1:{closed_port()}"
    env.update(PYTHONPATH=str(ROOT), HF_HOME=str(hf_home), HF_ENDPOINT=endpoint)

    def read(name):
        start = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-c", OFFLINE_READ, name, ""], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        assert f"treating {name} as a Hugging Face dataset" in done.stderr
        return done.stdout.strip().splitlines()[-1], time.monotonic() - start

    found, _ = read("someone/reward-mini")
    assert json.loads(found) == ["q0", "q1", "q2"]
    missing, seconds = read("someone/not-cached")
    assert missing == (
        f"error: someone/not-cached: no such file or folder, and no dataset of that name in the local "
        f"Hugging Face cache ({hf_home}); the Hub ({endpoint}) cannot be reached"
    )
    assert seconds < 20  # interpreter and `datasets` start-up; the retries alone took about 25 s


def test_a_path_in_an_existing_folder_is_a_missing_file_not_a_hub_name(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert sources.is_dataset("someone/reward-mini") and not sources.is_dataset("data/pairs")
    code, err, generate = run(["judge", "--model", "M", "--input", "data/pairs", "--output", "out.jsonl"])
    assert code == 2 and err == "rrm-jax: error: data/pairs: no such file\n"
    with pytest.raises(UserError, match="^data/pairs: no such file$"):
        read_preferences("data/pairs")
