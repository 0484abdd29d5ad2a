"""Batched pairwise judging: A/B order, voting and ties, decoding settings, and the `rrm-jax judge` command."""

import json
import re

import pytest
from judge_utils import ScriptedGenerate, boxed, build_test_tokenizer

from rrm_jax import cli, worksplit
from rrm_jax.errors import UserError
from rrm_jax.rrm import judge as judge_module
from rrm_jax.rrm.judge import Comparison, Judge, Judgment, is_swapped
from rrm_jax.rrm.prompt import render_ids


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_test_tokenizer(tmp_path_factory.mktemp("tok"))


def prefers(word):
    """A content judge: picks whichever shown response contains `word`, wherever it is shown."""
    return lambda query, first, second, s: boxed(1 if word in first else 2)


def always_first(query, first, second, s):
    return boxed(1)


COMPARISONS = [Comparison(f"question {k}", f"good answer {k}", f"poor answer {k}") for k in range(40)]


def test_position_is_randomised_reproducibly_and_mapped_back(tokenizer):
    content = ScriptedGenerate(tokenizer, prefers("good"))
    judgments = Judge(content, tokenizer, seed=7)(COMPARISONS)
    assert [j.winner for j in judgments] == [1] * 40  # a content judge is right whatever the order shown
    swapped = [j.swapped[0] for j in judgments]
    assert 10 < sum(swapped) < 30  # roughly half the items shown swapped
    assert swapped == [is_swapped(c, 7) for c in COMPARISONS]
    # The coin depends on the seed and the item, not on the batch it came in or the process.
    assert [j.swapped[0] for j in Judge(content, tokenizer, seed=7)(COMPARISONS[::-1])] == swapped[::-1]
    assert [is_swapped(c, 8) for c in COMPARISONS] != swapped
    # A judge that always says "Assistant 1" then picks response 1 exactly where it was not swapped.
    biased = Judge(ScriptedGenerate(tokenizer, always_first), tokenizer, seed=7)(COMPARISONS)
    assert [j.winner for j in biased] == [2 if s else 1 for s in swapped]


def test_prompts_sent_to_the_sampler_are_the_rendered_ids_in_the_shown_order(tokenizer):
    generate = ScriptedGenerate(tokenizer, prefers("good"))
    Judge(generate, tokenizer, seed=7)(COMPARISONS[:6])
    sent = generate.calls[0]["prompt_ids"]
    expected = []
    for c in COMPARISONS[:6]:
        first, second = (c.response_2, c.response_1) if is_swapped(c, 7) else (c.response_1, c.response_2)
        expected.append(render_ids(tokenizer, c.query, first, second))
    assert sorted(sent) == sorted(expected)  # the judge may reorder prompts by length for batching
    assert len(generate.calls) == 1


def test_both_orders_doubles_the_samples_and_cancels_position_bias(tokenizer):
    generate = ScriptedGenerate(tokenizer, always_first)
    judge = Judge(generate, tokenizer, both_orders=True, votes=2)
    judgments = judge(COMPARISONS[:5])
    for j in judgments:
        assert j.swapped == [False, False, True, True]
        assert (j.votes_1, j.votes_2, j.unparseable) == (2, 2, 0)
        assert j.tie and j.winner is None and j.score(1) == 0.5
    assert (judge.comparisons_judged, judge.samples_drawn) == (5, 20)
    assert generate.calls[0]["num_samples"] == 2 and len(generate.calls[0]["prompt_ids"]) == 10


@pytest.mark.parametrize(
    "sample_verdicts, winner, tie",
    [
        ([1, 2, 1], 1, False),
        ([2, None, None], 2, False),  # unparseable votes do not count against the parseable one
        ([1, 2], None, True),  # equal votes: a tie
        ([1, 2, None], None, True),
        ([None, None, None], None, True),  # nothing parseable is a tie too
        ([2, 2, 1, 1, 2], 2, False),
    ],
)
def test_voting_majority_and_ties(tokenizer, sample_verdicts, winner, tie):
    texts = {1: boxed(1), 2: boxed(2), None: "no verdict at all"}
    generate = ScriptedGenerate(tokenizer, lambda q, a, b, s: texts[sample_verdicts[s]])
    (j,) = Judge(generate, tokenizer, votes=len(sample_verdicts), both_orders=True)([Comparison("q", "x", "y")])
    # Shown unswapped first, then swapped: the swapped half's verdicts are mapped back to the caller's numbering.
    flipped = [None if v is None else 3 - v for v in sample_verdicts]
    assert j.verdicts == sample_verdicts + flipped
    assert j.winner is None and j.tie  # both orders of one position-only script always cancel

    (j,) = Judge(generate, tokenizer, votes=len(sample_verdicts), seed=1)([Comparison("q", "x", "y")])
    shown = flipped if j.swapped[0] else sample_verdicts
    assert j.verdicts == shown
    expected = None if winner is None else (3 - winner if j.swapped[0] else winner)
    assert (j.winner, j.tie) == (expected, tie)
    assert j.score(1) == (0.5 if tie else float(expected == 1))
    assert j.unparseable == sample_verdicts.count(None)


def test_decoding_defaults_follow_the_spec_and_are_overridable(tokenizer):
    generate = ScriptedGenerate(tokenizer, always_first)
    Judge(generate, tokenizer)(COMPARISONS[:1])
    call = generate.calls[-1]
    assert (call["temperature"], call["top_p"], call["top_k"], call["max_new_tokens"], call["max_think_tokens"]) == (
        0.6,
        1.0,
        0,
        8192,
        None,
    )
    assert call["num_samples"] == 1
    judge = Judge(
        generate,
        tokenizer,
        temperature=0.0,
        top_p=0.9,
        top_k=5,
        max_new_tokens=64,
        max_think_tokens=16,
        votes=3,
        seed=11,
        batch_size=2,
    )
    judge(COMPARISONS[:1])
    judge(COMPARISONS[1:2])
    first, second = generate.calls[-2], generate.calls[-1]
    assert (
        first["temperature"],
        first["top_p"],
        first["top_k"],
        first["max_new_tokens"],
        first["max_think_tokens"],
    ) == (0.0, 0.9, 5, 64, 16)
    assert (first["num_samples"], first["batch_size"]) == (3, 2)
    # every judge call (and every batch of its plan) draws fresh, reproducible randomness
    assert (first["seed"], second["seed"]) == (worksplit.batch_seed(11, 0, 0), worksplit.batch_seed(11, 1, 0))
    assert first["seed"] != second["seed"]


def test_results_return_to_input_order_when_prompts_are_sorted_by_length(tokenizer):
    items = [Comparison("q", "win" + "x" * (50 - 7 * k), "lose" + "y" * k) for k in range(7)]
    generate = ScriptedGenerate(tokenizer, prefers("win"))
    judgments = Judge(generate, tokenizer, votes=2)(items)
    assert [j.winner for j in judgments] == [1] * 7
    lengths = [len(p) for p in generate.calls[0]["prompt_ids"]]
    assert lengths == sorted(lengths)


@pytest.mark.parametrize(
    "option, message",
    [
        ({"votes": 0}, "votes must be >= 1"),
        ({"top_p": 0.0}, "top_p must be in"),
        ({"temperature": -1}, "temperature"),
        ({"max_think_tokens": 0}, "max_think_tokens must be >= 1"),
    ],
)
def test_bad_judge_options_are_user_errors(tokenizer, option, message):
    with pytest.raises(UserError, match=message):
        Judge(ScriptedGenerate(tokenizer, always_first), tokenizer, **option)


def test_judgment_counts():
    j = Judgment(verdicts=[1, None, 2, 2], texts=["a", "b", "c", "d"])
    assert (j.votes_1, j.votes_2, j.unparseable, j.winner, j.tie) == (1, 2, 1, 2, False)
    assert (j.score(2), j.score(1)) == (1.0, 0.0)


# --- the `rrm-jax judge` command, with a scripted judge in place of the model ---


@pytest.fixture
def scripted_backend(monkeypatch, tokenizer):
    generate = ScriptedGenerate(tokenizer, prefers("good"))
    loaded = []
    monkeypatch.setattr(
        judge_module, "load_backend", lambda path, **options: loaded.append(path) or (generate, tokenizer)
    )
    return loaded


def test_judge_command_single_pair_prints_reasoning_and_verdict(scripted_backend, capsys):
    code = cli.main(
        ["judge", "--model", "M", "--query", "Which?", "--response-1", "poor", "--response-2", "good", "--votes", "3"]
    )
    out = capsys.readouterr().out
    assert code == 0 and scripted_backend == ["M"]
    assert out.count("Let me compare them.") == 3
    assert out.strip().endswith("verdict: response 2 (votes: response 1 0, response 2 3, unparseable 0)")


def test_judge_command_passes_the_kv_pool_to_the_sampler_only_when_given(monkeypatch, tokenizer, capsys):
    generate = ScriptedGenerate(tokenizer, prefers("good"))
    monkeypatch.setattr(judge_module, "load_backend", lambda path, **options: (generate, tokenizer))
    pair = ["--query", "Which?", "--response-1", "poor", "--response-2", "good"]
    assert cli.main(["judge", "--model", "M", *pair, "--kv-pool-gb", "2.5"]) == 0
    assert cli.main(["judge", "--model", "M", *pair]) == 0
    assert [call.get("kv_pool_gb", "absent") for call in generate.calls] == [2.5, "absent"]


def test_judge_command_labels_each_vote_with_the_response_it_means(scripted_backend, capsys):
    assert (
        cli.main(
            [
                "judge",
                "--model",
                "M",
                "--query",
                "Which?",
                "--response-1",
                "poor",
                "--response-2",
                "good",
                "--both-orders",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    blocks = re.findall(
        r"\(Assistant 1 = response (\d), Assistant 2 = response (\d)\) ---\n.*?\\boxed\{Assistant (\d)\}.*?"
        r"=> vote \d: response (\d)",
        out,
        flags=re.S,
    )
    assert sorted(b[:2] for b in blocks) == [("1", "2"), ("2", "1")]  # one judgment in each A/B order
    for first, second, chosen, vote in blocks:
        assert vote == (first, second)[int(chosen) - 1] == "2"  # "good" is response 2 whatever its position


def test_judge_command_jsonl(scripted_backend, tmp_path, capsys):
    rows = [
        {"id": 1, "query": "q1", "response_1": "good one", "response_2": "bad one"},
        {"id": 2, "query": "q2", "response_1": "meh", "response_2": "good"},
    ]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert cli.main(["judge", "--model", "M", "--input", str(src), "--output", str(out), "--votes", "2"]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [w["id"] for w in written] == [1, 2] and [w["verdict"] for w in written] == [1, 2]
    assert written[0]["votes"] == {"1": 2, "2": 0, "unparseable": 0} and written[0]["tie"] is False
    assert len(written[0]["reasoning"]) == 2 and "\\boxed{Assistant" in written[0]["reasoning"][0]
    assert "judged 2 pairs (4 samples): 0 ties" in capsys.readouterr().out


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            '{"query": "q", "response_1": "a"}\n',
            "in.jsonl line 1: missing field 'response_2' (rows need query, response_1, response_2)",
        ),
        (
            '{"query": "q", "response_1": "a", "response_2": "b"}\n\n{"query": 3, "response_1": "a", "response_2": "b"}\n',
            "in.jsonl line 3: field must be a string: 'query'",
        ),
        ('{"query": "q", "response_1": "a", "response_2": "b"}\n{oops\n', "in.jsonl line 2: not valid JSON"),
        (
            '["not", "objects"]',
            "in.jsonl line 1: expected an object with fields query, response_1, response_2; got str",
        ),
    ],
)
def test_judge_command_bad_rows_fail_in_one_line_before_loading(scripted_backend, tmp_path, capsys, rows, message):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(rows)
    assert cli.main(["judge", "--model", "M", "--input", str(src), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rrm-jax: error: ") and message in err and err.count("\n") == 1
    assert not out.exists() and scripted_backend == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--query", "q", "--response-1", "a"], "give --query, --response-1 and --response-2"),
        (["--input", "x.jsonl"], "--input needs --output"),
        (["--query", "q", "--response-1", "a", "--response-2", "b", "--votes", "0"], "votes must be >= 1"),
        (
            ["--query", "q", "--response-1", "a", "--response-2", "b", "--kv-pool-gb", "0"],
            "--kv-pool-gb must be a positive number of GB, got 0.0",
        ),
        (
            ["--query", "q", "--response-1", "a", "--response-2", "b", "--chat-template", "chatml"],
            "unknown chat template",
        ),
    ],
)
def test_judge_command_bad_flags(scripted_backend, capsys, argv, message):
    assert cli.main(["judge", "--model", "M", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and scripted_backend == []
