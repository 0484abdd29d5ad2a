"""ELO round robin and knockout best-of-N: ratings, comparison counts, byes, bracket order, batching."""

import json
import math
import random
from pathlib import Path

import pytest

from rrm_jax.errors import UserError
from rrm_jax.rrm.rank import (
    check_bracket,
    elo_ratings,
    elo_round_robin,
    elo_round_robin_many,
    knockout,
    knockout_many,
    round_robin_order,
    seeded_bracket,
)

TOURNAMENT = json.loads((Path(__file__).parent / "data" / "tournament.json").read_text())


def test_elo_against_a_hand_computed_sequence():
    ratings = elo_ratings(3, [(0, 1, 1.0), (1, 2, 0.5), (2, 0, 0.0)])
    # By hand (E_a = 1 / (1 + 10 ** ((R_b - R_a) / 400)), K = 4):
    # (0 beats 1) from 1000/1000: E = 0.5 -> 1002, 998.
    # (1 ties 2) from 998/1000: E_1 = 1 / (1 + 10 ** 0.005) = 0.4971218 -> 1 gains 0.0115128, 2 loses it.
    # (0 beats 2) from 1002/999.9884872: E_0 = 1 / (1 + 10 ** (-0.0050288)) = 0.5028947 -> 0 gains 1.9884209.
    assert ratings == pytest.approx([1003.9884209, 998.0115128, 998.0000663], abs=1e-6)


def test_elo_updates_both_players_from_pre_match_ratings():
    ratings = elo_ratings(2, [(0, 1, 1.0)] * 3, k=32)
    expected = [1000.0, 1000.0]
    for _ in range(3):  # the textbook logistic form, applied independently here
        e0 = 1 / (1 + 10 ** ((expected[1] - expected[0]) / 400))
        expected = [expected[0] + 32 * (1 - e0), expected[1] + 32 * (0 - (1 - e0))]
    assert ratings == pytest.approx(expected, abs=1e-9)
    assert sum(ratings) == pytest.approx(2000.0)  # zero-sum
    assert elo_ratings(2, [(0, 1, 1.0)], initial=0, base=math.e, scale=1.0, k=1) == pytest.approx([0.5, -0.5])


def test_round_robin_order_is_every_pair_once_in_a_seeded_shuffle():
    order = round_robin_order(6, seed=3)
    assert sorted(order) == [(i, j) for i in range(6) for j in range(i + 1, 6)]
    assert order == round_robin_order(6, seed=3)
    assert order != round_robin_order(6, seed=4)
    expected = [(i, j) for i in range(6) for j in range(i + 1, 6)]
    random.Random(3).shuffle(expected)
    assert order == expected


def strength_compare(strength):
    """A judge that always prefers the stronger candidate; records each batch."""
    calls = []

    def compare(pairs):
        calls.append(list(pairs))
        return [i if strength[i] > strength[j] else j for i, j in pairs]

    return compare, calls


def test_elo_round_robin_picks_the_strongest_and_breaks_ties_by_first_index():
    strength = [0.2, 0.9, 0.5, 0.1, 0.7]
    compare, calls = strength_compare(strength)
    result = elo_round_robin(5, compare, seed=1)
    assert len(calls) == 1 and len(calls[0]) == 10
    assert [(i, j) for i, j, _ in result.matches] == round_robin_order(5, seed=1)
    assert result.ratings == pytest.approx(elo_ratings(5, result.matches))
    assert result.best == 1
    # A judge that always ties: every rating stays 1000 and the first candidate is picked.
    tied = elo_round_robin(4, lambda pairs: [None] * len(pairs))
    assert tied.ratings == [1000.0] * 4 and tied.best == 0
    assert {s for _, _, s in tied.matches} == {0.5}


def test_elo_round_robin_many_sends_every_question_in_one_batch():
    calls = []

    def compare(batch):
        calls.append(batch)
        return [min(i, j) for _, i, j in batch]

    results = elo_round_robin_many([3, 2, 4], compare, seed=0)
    assert len(calls) == 1
    assert sorted(calls[0]) == sorted(
        [(0, i, j) for i, j in round_robin_order(3)] + [(1, 0, 1)] + [(2, i, j) for i, j in round_robin_order(4)]
    )
    assert [r.best for r in results] == [0, 0, 0]


@pytest.mark.parametrize("n", list(range(1, 18)) + [31, 32, 33])
def test_knockout_takes_n_minus_1_comparisons_in_ceil_log2_rounds_with_byes_in_round_one(n):
    strength = random.Random(n).sample(range(100), n)
    compare, calls = strength_compare(strength)
    result = knockout(n, compare, seed=n)
    rounds = math.ceil(math.log2(n)) if n > 1 else 0
    assert len(calls) == rounds == len(result.rounds)
    assert sum(len(c) for c in calls) == n - 1
    slots = 1 << (n - 1).bit_length()
    assert len(result.byes) == slots - n
    if n > 1:
        assert set(result.byes).isdisjoint(c for i, j, _ in result.rounds[0] for c in (i, j))
    for played in result.rounds:  # nobody plays twice in a round
        players = [c for i, j, _ in played for c in (i, j)]
        assert len(players) == len(set(players))
    for earlier, later in zip(result.rounds, result.rounds[1:]):  # only winners (and byes) go on
        advanced = {w for _, _, w in earlier} | set(result.byes)
        assert {c for i, j, _ in later for c in (i, j)} <= advanced
    assert result.winner == max(range(n), key=lambda c: strength[c])


def test_knockout_follows_the_official_bracket_round_by_round():
    round_1 = TOURNAMENT["round_1"]
    strength = random.Random(0).sample(range(1000), 32)
    compare, calls = strength_compare(strength)
    result = knockout(32, compare, bracket=round_1)
    assert [[i, j] for i, j, _ in result.rounds[0]] == round_1
    assert result.byes == []
    # Winners of adjacent matches meet: match m of round r draws one player from each half of the
    # official file's group m for that round.
    for r in range(2, 6):
        groups = TOURNAMENT[f"round_{r}"]
        assert len(result.rounds[r - 1]) == len(groups)
        for (i, j, _), group in zip(result.rounds[r - 1], groups):
            half = len(group) // 2
            assert i in group[:half] and j in group[half:]
    assert result.winner == max(range(32), key=lambda c: strength[c])


def test_seeded_bracket_is_reproducible_and_places_byes_first():
    assert seeded_bracket(6, seed=2) == seeded_bracket(6, seed=2)
    assert seeded_bracket(6, seed=2) != seeded_bracket(6, seed=5)
    order = list(range(6))
    random.Random(2).shuffle(order)
    # 6 candidates fill 8 slots: the first 2 of the shuffle get byes, the other 4 play in pairs.
    assert seeded_bracket(6, seed=2) == [(order[0],), (order[1],), (order[2], order[3]), (order[4], order[5])]
    assert check_bracket(6, seeded_bracket(6, seed=2)) == seeded_bracket(6, seed=2)


def test_knockout_tie_advances_the_first_of_the_pair():
    result = knockout(5, lambda pairs: [None] * len(pairs), bracket=[[3], [1], [2], [4, 0]])
    assert result.rounds == [[(4, 0, 4)], [(3, 1, 3), (2, 4, 2)], [(3, 2, 3)]]
    assert result.byes == [3, 1, 2] and result.winner == 3


def test_knockout_many_batches_each_round_across_questions():
    calls = []

    def compare(batch):
        calls.append(batch)
        return [max(i, j) for _, i, j in batch]

    results = knockout_many([8, 5, 2, 1], compare, seed=0)
    # Round 1: 4 matches of 8, 1 of 5 (3 byes), 1 of 2; 1 candidate needs none. Then 2 + 2, then 1 + 1.
    assert [len(c) for c in calls] == [6, 4, 2]
    assert {q for q, _, _ in calls[0]} == {0, 1, 2} and {q for q, _, _ in calls[1]} == {0, 1}
    assert [r.winner for r in results] == [7, 4, 1, 0]
    assert results[3].rounds == [] and results[1].byes and len(results[1].byes) == 3


def test_bad_brackets_and_bad_winners_are_refused():
    with pytest.raises(UserError, match="each candidate 0..3 exactly once"):
        knockout(4, lambda p: [i for i, _ in p], bracket=[[0, 1], [1, 2]])
    with pytest.raises(UserError, match="needs 4 first-round entries"):
        knockout(5, lambda p: [i for i, _ in p], bracket=[[0, 1], [2, 3], [4]])
    with pytest.raises(UserError, match="each candidate"):
        knockout(3, lambda p: [i for i, _ in p], bracket=[[0, 1, 2], [3]])
    with pytest.raises(ValueError, match="returned 7 as the winner of pair"):
        knockout(2, lambda pairs: [7])
    with pytest.raises(ValueError, match="returned 0 winners for 1 pairs"):
        elo_round_robin(2, lambda pairs: [])


# --- the `rrm-jax rank` command, with a scripted judge in place of the model ---


@pytest.fixture
def good_judge(monkeypatch, tmp_path_factory):
    """`rrm-jax rank` judging with a script that prefers the shown response containing "good"."""
    from judge_utils import ScriptedGenerate, boxed, build_test_tokenizer

    from rrm_jax.rrm import judge as judge_module

    tokenizer = build_test_tokenizer(tmp_path_factory.mktemp("tok"))
    generate = ScriptedGenerate(tokenizer, lambda q, first, second, s: boxed(1 if "good" in first else 2))
    monkeypatch.setattr(judge_module, "load_backend", lambda path, **options: (generate, tokenizer))
    return generate


def exit_code(argv):
    from rrm_jax import cli

    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse errors
        return e.code


ROWS = [
    {
        "query": "q1",
        "responses": ["bad a", "good", "bad b", "bad c", "bad d"],
        "correct": [False, True, False, False, False],
    },
    {"query": "q2", "responses": ["bad", "worse", "good"], "correct": [False, False, True]},
    {"query": "q3", "responses": ["good", "bad"]},
]


@pytest.mark.parametrize("strategy, comparisons", [("knockout", 4 + 2 + 1), ("elo", 10 + 3 + 1)])
def test_rank_command(good_judge, tmp_path, capsys, strategy, comparisons):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert (
        exit_code(
            ["rank", "--model", "M", "--input", str(src), "--strategy", strategy, "--output", str(out), "--votes", "3"]
        )
        == 0
    )
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [w["pick"] for w in written] == [1, 2, 0]
    assert [w.get("pick_correct") for w in written] == [True, True, None]
    assert all(w["strategy"] == strategy and w["query"] == r["query"] for w, r in zip(written, ROWS))
    if strategy == "elo":
        assert len(written[0]["ratings"]) == 5 and max(written[0]["ratings"]) == written[0]["ratings"][1]
    else:
        assert sum(len(r) for r in written[0]["rounds"]) == 4 and len(written[0]["byes"]) == 3
        assert len(good_judge.calls) == 3  # one sampler call per round, all questions together
    printed = capsys.readouterr().out
    assert "best-of-N accuracy: 1.0000 over 2 questions (random pick: 0.2667)" in printed
    assert f"judge calls: {comparisons} comparisons, {3 * comparisons} samples" in printed


def test_rank_command_with_the_official_bracket(good_judge, tmp_path):
    responses = [f"bad {k}" for k in range(32)]
    responses[17] = "good"
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"query": "q", "responses": responses}) + "\n")
    bracket = Path(__file__).parent / "data" / "tournament.json"
    argv = [
        "rank",
        "--model",
        "M",
        "--input",
        str(src),
        "--strategy",
        "knockout",
        "--output",
        str(out),
        "--bracket",
        str(bracket),
    ]
    assert exit_code(argv) == 0
    (written,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert written["pick"] == 17
    assert [[i, j] for i, j, _ in written["rounds"][0]] == TOURNAMENT["round_1"]


@pytest.mark.parametrize(
    "rows, extra, message",
    [
        (
            [{"query": "q", "responses": ["only one"]}],
            [],
            "in.jsonl line 1: 'responses' has 1 entries; ranking needs at least 2",
        ),
        ([ROWS[0], {"responses": ["a", "b"]}], [], "in.jsonl line 2: missing field 'query'"),
        ([{"query": "q", "responses": "a b"}], [], "in.jsonl line 1: 'responses' must be a list of strings"),
        ([{"query": "q", "responses": ["a", "b"], "correct": [True]}], [], "'correct' must be a list of 2 booleans"),
        ([ROWS[0]], ["--bracket", "tournament.json"], "does not fit"),
        ([ROWS[2]], ["--strategy", "best"], "argument --strategy: invalid choice: 'best'"),
    ],
)
def test_rank_command_bad_input(good_judge, tmp_path, capsys, monkeypatch, rows, extra, message):
    monkeypatch.chdir(Path(__file__).parent / "data")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [
        "rank",
        "--model",
        "M",
        "--input",
        str(src),
        "--output",
        str(out),
        *(extra if "--strategy" in extra else ["--strategy", "knockout", *extra]),
    ]
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("rrm-jax: error: ") and message in err and err.count("\n") == 1
    assert not out.exists() and good_judge.calls == []
