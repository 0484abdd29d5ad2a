"""Best-of-N selection with a pairwise judge: ELO round robin and knockout tournament.

Pure Python: the judge comes in as a `compare` callable that gets a whole batch of pairs at once and
returns, per pair, the winning candidate index, or None for a tie (e.g. a tie of votes). Batching
across questions is what keeps the sampler busy: the `*_many` functions hand every comparison of a
round, over all questions, to one `compare` call, whose pairs are `(question, i, j)`.

Ties: in ELO a tie scores 0.5 for both players (the official constants); in a knockout the first
candidate of the pair advances, which is unbiased because the bracket order is a seeded shuffle.

The `rrm-jax rank` command (`configure`) runs either strategy over a JSONL file of questions.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rrm_jax import distributed, options
from rrm_jax.data.rows import require_text
from rrm_jax.errors import UserError
from rrm_jax.rrm import spec
from rrm_jax.rrm.judge import Comparison
from rrm_jax.rrm.judge_commands import add_judge_arguments, judge_settings, rows_from_args, run_journaled

Pair = tuple[int, int]
QuestionPair = tuple[int, int, int]  # (question, i, j)


def elo_ratings(
    n: int,
    matches: Sequence[tuple[int, int, float]],
    *,
    k: float = spec.ELO_K,
    initial: float = spec.ELO_INITIAL,
    base: float = spec.ELO_BASE,
    scale: float = spec.ELO_SCALE,
) -> list[float]:
    """Online ELO over `matches` in the given order; (i, j, s) with s = 1.0 if i won, 0.0 if j won, 0.5 a tie.

    Both players are updated from their pre-match ratings: E_i = q_i / (q_i + q_j) with
    q = base ** (R / scale), and R_i += k * (s - E_i), R_j += k * ((1 - s) - E_j).
    """
    ratings = [float(initial)] * n
    for i, j, s in matches:
        if not (0 <= i < n and 0 <= j < n and i != j):
            raise ValueError(f"match ({i}, {j}) is not a pair of distinct candidates among {n}")
        q_i, q_j = base ** (ratings[i] / scale), base ** (ratings[j] / scale)
        expected_i, expected_j = q_i / (q_i + q_j), q_j / (q_i + q_j)
        ratings[i], ratings[j] = ratings[i] + k * (s - expected_i), ratings[j] + k * ((1.0 - s) - expected_j)
    return ratings


def round_robin_order(n: int, seed: int = 0) -> list[Pair]:
    """Every unordered pair (i < j) once, in a seeded shuffled order (the order ELO applies them in)."""
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    random.Random(seed).shuffle(pairs)
    return pairs


@dataclass
class EloResult:
    best: int  # highest rating, ties to the first index
    ratings: list[float]
    matches: list[tuple[int, int, float]]  # in the order they were applied


def elo_round_robin_many(
    sizes: Sequence[int],
    compare: Callable[[list[QuestionPair]], list[int | None]],
    *,
    seed: int = 0,
    k: float = spec.ELO_K,
) -> list[EloResult]:
    """Round robin for several questions (`sizes[q]` candidates each) with all n(n-1)/2 pairs in one batch."""
    orders = [round_robin_order(n, seed) for n in sizes]
    batch = [(q, i, j) for q, order in enumerate(orders) for i, j in order]
    winners = iter(_checked_winners(batch, compare(batch)))
    results = []
    for n, order in zip(sizes, orders):
        matches = [(i, j, _elo_score(i, next(winners))) for i, j in order]
        ratings = elo_ratings(n, matches, k=k)
        results.append(EloResult(best=ratings.index(max(ratings)), ratings=ratings, matches=matches))
    return results


def _elo_score(i: int, winner: int | None) -> float:
    return 0.5 if winner is None else float(winner == i)


def elo_round_robin(
    n: int, compare: Callable[[list[Pair]], list[int | None]], *, seed: int = 0, k: float = spec.ELO_K
) -> EloResult:
    """`elo_round_robin_many` for one question; `compare` gets plain (i, j) pairs."""
    return elo_round_robin_many([n], _single_question(compare), seed=seed, k=k)[0]


def seeded_bracket(n: int, seed: int = 0) -> list[tuple[int, ...]]:
    """A first round for n candidates: a seeded shuffle, paired consecutively, with byes when n is no power of two.

    With P the next power of two >= n, the first P - n candidates of the shuffle get a bye (a 1-tuple
    entry) and move straight to round 2, so every later round is a power of two and the tournament takes
    n - 1 comparisons in ceil(log2 n) rounds.
    """
    if n < 1:
        raise ValueError("a knockout needs at least one candidate")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_byes = _bracket_slots(n) - n
    return [(c,) for c in order[:n_byes]] + [tuple(order[p : p + 2]) for p in range(n_byes, n, 2)]


def _bracket_slots(n: int) -> int:
    return 1 << (n - 1).bit_length()


def check_bracket(n: int, bracket: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """Validate an explicit first round (pairs, and 1-entry byes) for n candidates; returns it as tuples."""
    entries = [tuple(e) for e in bracket]
    flat = [c for e in entries for c in e]
    if sorted(flat) != list(range(n)) or any(len(e) not in (1, 2) for e in entries):
        raise UserError(
            f"bracket must use each candidate 0..{n - 1} exactly once, in pairs or 1-entry byes; "
            f"it holds {len(flat)} candidates from {min(flat, default=None)} to {max(flat, default=None)}"
        )
    if n > 1 and len(entries) != _bracket_slots(n) // 2:
        raise UserError(
            f"a bracket for {n} candidates needs {_bracket_slots(n) // 2} first-round entries (pairs plus byes), got {len(entries)}"
        )
    return entries


@dataclass
class KnockoutResult:
    winner: int
    rounds: list[list[tuple[int, int, int]]]  # per round, its matches as (i, j, winner)
    byes: list[int]  # candidates that skipped round 1


class _Knockout:
    """One bracket advanced round by round: adjacent entries' winners meet in the next round."""

    def __init__(self, entries: list[tuple[int, ...]]):
        self.entries = entries
        byes = [e[0] for e in entries if len(e) == 1] if len(entries) > 1 else []  # a lone candidate has no bye
        self.result = KnockoutResult(winner=-1, rounds=[], byes=byes)
        self._finish_if_done()

    def pending(self) -> list[Pair]:
        return [e for e in self.entries if len(e) == 2]

    def play(self, winners: list[int | None]) -> None:
        it = iter(winners)
        advancing, matches = [], []
        for entry in self.entries:
            if len(entry) == 1:
                advancing.append(entry[0])
                continue
            i, j = entry
            winner = next(it)
            winner = i if winner is None else winner  # a tie: the first of the pair advances
            matches.append((i, j, winner))
            advancing.append(winner)
        self.result.rounds.append(matches)
        self.entries = [tuple(advancing[p : p + 2]) for p in range(0, len(advancing), 2)]
        self._finish_if_done()

    def _finish_if_done(self) -> None:
        if len(self.entries) == 1 and len(self.entries[0]) == 1:
            self.result.winner = self.entries[0][0]

    @property
    def done(self) -> bool:
        return self.result.winner >= 0


def knockout_many(
    sizes: Sequence[int],
    compare: Callable[[list[QuestionPair]], list[int | None]],
    *,
    bracket: Sequence[Sequence[int]] | None = None,
    seed: int = 0,
) -> list[KnockoutResult]:
    """Knockouts for several questions in lock step: each round's matches of every question are one batch.

    Every question of n candidates uses `seeded_bracket(n, seed)`, or the explicit `bracket` (which
    must then fit every question's n), as the official best-of-32 runs used one fixed bracket.
    """
    games = [_Knockout(check_bracket(n, bracket) if bracket is not None else seeded_bracket(n, seed)) for n in sizes]
    while not all(g.done for g in games):
        batch = [(q, i, j) for q, g in enumerate(games) if not g.done for i, j in g.pending()]
        winners = iter(_checked_winners(batch, compare(batch)))
        for g in games:
            if not g.done:
                g.play([next(winners) for _ in g.pending()])
    return [g.result for g in games]


def knockout(
    n: int,
    compare: Callable[[list[Pair]], list[int | None]],
    *,
    bracket: Sequence[Sequence[int]] | None = None,
    seed: int = 0,
) -> KnockoutResult:
    """Single-elimination best-of-n; `compare(pairs)` gets a whole round's (i, j) pairs and returns each winner."""
    return knockout_many([n], _single_question(compare), bracket=bracket, seed=seed)[0]


def _single_question(compare):
    return lambda batch: compare([(i, j) for _, i, j in batch])


def _checked_winners(batch: list[QuestionPair], winners: list[int | None]) -> list[int | None]:
    winners = list(winners)
    if len(winners) != len(batch):
        raise ValueError(f"compare returned {len(winners)} winners for {len(batch)} pairs")
    for (_, i, j), w in zip(batch, winners):
        if w not in (i, j, None):
            raise ValueError(f"compare returned {w} as the winner of pair ({i}, {j})")
    return winners


# ---------------------------------------------------------------------------------------------------
# `rrm-jax rank`

_RANK_FIELDS = "query, responses (a list of >= 2 strings), optional correct (a list of booleans)"


def configure(parser) -> None:
    add_judge_arguments(parser)
    options.add_input_arguments(parser, "rows {query, responses: [...], correct: [...] (optional)}")
    parser.add_argument("--strategy", required=True, choices=("elo", "knockout"), help="ELO round robin or knockout")
    parser.add_argument(
        "--output", required=True, help="JSONL file for each question's pick with its ratings or bracket"
    )
    parser.add_argument(
        "--bracket",
        help="knockout: JSON first round for every question, a list of pairs (1-entry "
        "lists are byes) or an object with 'round_1' like the official tournament.json",
    )
    options.add_resume_argument(parser)
    parser.set_defaults(run=run_rank)


@dataclass
class _Question:
    where: str  # "FILE line N", for error messages
    row: dict
    query: str
    responses: list[str]
    correct: list[bool] | None


def _read_questions(rows: list[tuple[str, dict]]) -> list[_Question]:
    questions = []
    for where, row in rows:
        query = require_text(where, row, "query", _RANK_FIELDS)
        responses = row.get("responses")
        if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
            raise UserError(f"{where}: 'responses' must be a list of strings (rows need {_RANK_FIELDS})")
        if len(responses) < 2:
            raise UserError(f"{where}: 'responses' has {len(responses)} entries; ranking needs at least 2")
        correct = row.get("correct")
        if correct is not None and (
            not isinstance(correct, list)
            or len(correct) != len(responses)
            or not all(isinstance(c, bool) for c in correct)
        ):
            raise UserError(f"{where}: 'correct' must be a list of {len(responses)} booleans, one per response")
        questions.append(_Question(where, row, query, responses, correct))
    return questions


def _read_bracket(path: str, questions: list[_Question]) -> list[list[int]]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read a JSON bracket ({e})") from None
    entries = data.get("round_1") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not all(
        isinstance(e, list) and all(isinstance(c, int) for c in e) for e in entries
    ):
        raise UserError(f"{path}: a bracket is a list of [i, j] pairs and [i] byes, or an object with 'round_1'")
    for q in questions:
        try:
            check_bracket(len(q.responses), entries)
        except UserError as e:
            raise UserError(f"{path}: does not fit {q.where} with {len(q.responses)} responses: {e}") from None
    return entries


def run_rank(args) -> int:
    rows = rows_from_args(args, ("query", "responses"), _RANK_FIELDS)
    questions = _read_questions(rows)
    if args.bracket is not None and args.strategy != "knockout":
        raise UserError("--bracket is for --strategy knockout")
    bracket = _read_bracket(args.bracket, questions) if args.bracket else None
    settings = judge_settings(args, rows, strategy=args.strategy, bracket=bracket)
    journal, judge, results = run_journaled(
        args, "rank", settings, "comparisons", lambda judge: _tournaments(args, questions, judge, bracket)
    )

    lines = []
    for q, result in zip(questions, results):
        if q.correct is not None:
            result["pick_correct"] = q.correct[result["pick"]]
        lines.append(json.dumps({**q.row, "strategy": args.strategy, **result}, ensure_ascii=False, default=str))
    journal.partial.finish("\n".join(lines) + "\n")
    if not distributed.is_main_process():
        return 0
    graded = [(q.correct, result["pick"]) for q, result in zip(questions, results) if q.correct is not None]
    if graded:
        accuracy = sum(correct[pick] for correct, pick in graded) / len(graded)
        random_pick = sum(sum(correct) / len(correct) for correct, _ in graded) / len(graded)
        print(f"best-of-N accuracy: {accuracy:.4f} over {len(graded)} questions (random pick: {random_pick:.4f})")
    print(f"judge calls: {judge.comparisons_judged} comparisons, {judge.samples_drawn} samples -> {args.output}")
    return 0


def _tournaments(args, questions: list[_Question], judge, bracket) -> list[dict]:
    """Each question's pick and its ratings (ELO) or rounds and byes (knockout); every round's
    comparisons over all questions are one judge call."""

    def compare(batch: list[QuestionPair]) -> list[int | None]:
        judgments = judge(
            [Comparison(questions[q].query, questions[q].responses[i], questions[q].responses[j]) for q, i, j in batch]
        )
        return [None if jd.winner is None else (i, j)[jd.winner - 1] for (_, i, j), jd in zip(batch, judgments)]

    sizes = [len(q.responses) for q in questions]
    if args.strategy == "elo":
        return [{"pick": r.best, "ratings": r.ratings} for r in elo_round_robin_many(sizes, compare, seed=args.seed)]
    return [
        {"pick": r.winner, "rounds": r.rounds, "byes": r.byes}
        for r in knockout_many(sizes, compare, bracket=bracket, seed=args.seed)
    ]
