"""`rrm-jax judge`: which of two responses is better, for one pair (`--query --response-1 --response-2`,
printed) or for every row of an input (`--input --output`, JSONL verdicts, resumable)."""

from __future__ import annotations

import argparse
import json

from rrm_jax import distributed, options
from rrm_jax.data.rows import require_text
from rrm_jax.errors import UserError
from rrm_jax.rrm.judge import Comparison, Judgment, warn_neutralised
from rrm_jax.rrm.judge_commands import (
    add_judge_arguments,
    judge_from_args,
    judge_settings,
    rows_from_args,
    run_journaled,
)

_JUDGE_FIELDS = "query, response_1, response_2"
_JUDGE_COLUMNS = ("query", "response_1", "response_2")


def configure(parser: argparse.ArgumentParser) -> None:
    add_judge_arguments(parser)
    parser.add_argument("--query", help="the instruction / question")
    parser.add_argument("--response-1", help="first candidate response")
    parser.add_argument("--response-2", help="second candidate response")
    options.add_input_arguments(parser, f"rows {{{_JUDGE_FIELDS}}} to judge", required=False)
    parser.add_argument("--output", help="JSONL file for the verdicts (with --input)")
    options.add_resume_argument(parser)
    parser.set_defaults(run=run_judge)


def judgment_record(j: Judgment) -> dict:
    return {
        "verdict": j.winner,
        "tie": j.tie,
        "votes": {"1": j.votes_1, "2": j.votes_2, "unparseable": j.unparseable},
        "swapped": j.swapped,
        "reasoning": j.texts,
    }


def run_judge(args: argparse.Namespace) -> int:
    single = (args.query, args.response_1, args.response_2)
    if args.input is None:
        if any(v is None for v in single):
            raise UserError("give --query, --response-1 and --response-2 (or --input FILE.jsonl --output FILE.jsonl)")
        if args.output is not None or args.resume:
            raise UserError("--output and --resume go with --input")
        judge = judge_from_args(args, progress=False)
        (j,) = judge([Comparison(*single)])
        warn_neutralised(judge)
        if distributed.is_main_process():
            for number, (text, swapped, verdict) in enumerate(zip(j.texts, j.swapped, j.verdicts), start=1):
                first, second = (2, 1) if swapped else (1, 2)
                print(
                    f"--- judgment {number}/{len(j.texts)} (Assistant 1 = response {first}, Assistant 2 = "
                    f"response {second}) ---\n{text}\n"
                )
                print(f"=> vote {number}: " + (f"response {verdict}" if verdict else "unparseable") + "\n")
            verdict = "tie" if j.winner is None else f"response {j.winner}"
            print(
                f"verdict: {verdict} (votes: response 1 {j.votes_1}, response 2 {j.votes_2}, unparseable {j.unparseable})"
            )
        return 0

    if any(v is not None for v in single):
        raise UserError("give either --input/--output or --query/--response-1/--response-2, not both")
    if args.output is None:
        raise UserError("--input needs --output FILE.jsonl for the verdicts")
    rows = rows_from_args(args, _JUDGE_COLUMNS, _JUDGE_FIELDS)
    comparisons = [
        Comparison(*(require_text(where, row, k, _JUDGE_FIELDS) for k in _JUDGE_COLUMNS)) for where, row in rows
    ]
    journal, judge, judgments = run_journaled(
        args, "judge", judge_settings(args, rows), "pairs", lambda judge: judge(comparisons)
    )
    lines = [
        json.dumps({**row, **judgment_record(j)}, ensure_ascii=False, default=str)
        for (_, row), j in zip(rows, judgments)
    ]
    journal.partial.finish("\n".join(lines) + "\n")
    if distributed.is_main_process():
        ties = sum(j.tie for j in judgments)
        unparseable = sum(j.unparseable for j in judgments)
        resumed = len(judgments) - judge.comparisons_judged
        print(
            f"judged {len(judgments)} pairs ({judge.samples_drawn} samples{f'; {resumed} pairs from the partial file' if resumed else ''}): "
            f"{ties} ties, {unparseable} unparseable samples -> {args.output}"
        )
    return 0
