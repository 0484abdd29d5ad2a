"""Batched pairwise judging with an RRM: position randomisation, voting, thinking budget.

The judge is written against a generation callable with the signature of `rrm_jax.sample` without
the model,

    generate(prompt_ids, *, max_new_tokens, temperature, top_p, top_k, num_samples, seed, max_think_tokens,
             batch_size, progress) -> list of results with `.text`, prompt-major (num_samples per prompt)

so production passes `functools.partial(rrm_jax.sample, model, tokenizer=tokenizer)` (`load_backend`)
and tests pass a scripted judge.

Rules (documented in the README):
- A/B order: each comparison is shown swapped or not by a coin derived from SHA-256 of the seed and the
  comparison's text (never Python's per-process salted hash()), so it does not depend on batch layout;
  `both_orders=True` shows every comparison in both orders instead (twice the samples).
- Voting: `votes` samples per shown order; the verdict is the majority of the parseable votes. Equal
  counts (including no parseable vote at all) are a tie: `winner` is None and `tie` is True; scoring
  counts a tie as 0.5 (as the spec scores an unparseable single verdict), ELO as a draw, and a knockout
  advances the first candidate of the pair.
- Decoding defaults are those of the published evaluations (temperature 0.6, top_p 1.0, no top-k,
  8192 new tokens); `max_think_tokens` is passed to the sampler, which forces `</think>` there.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Sequence

from rrm_jax import distributed
from rrm_jax.errors import UserError
from rrm_jax.rrm import spec
from rrm_jax.rrm.prompt import chat_template_named, encode, parse_verdict, render


@dataclass(frozen=True)
class Comparison:
    query: str
    response_1: str
    response_2: str


@dataclass
class Judgment:
    """Every sampled judgment of one comparison; verdicts are in the caller's numbering (1 = response_1)."""

    verdicts: list[int | None]  # per sample, None = unparseable
    texts: list[str]  # per sample, the generated reasoning and verdict
    swapped: list[bool] = field(default_factory=list)  # per sample, True = response_2 was shown as Assistant 1

    @property
    def votes_1(self) -> int:
        return self.verdicts.count(1)

    @property
    def votes_2(self) -> int:
        return self.verdicts.count(2)

    @property
    def unparseable(self) -> int:
        return self.verdicts.count(None)

    @property
    def tie(self) -> bool:
        return self.votes_1 == self.votes_2

    @property
    def winner(self) -> int | None:
        """1 or 2 by majority of parseable votes; None on a tie."""
        if self.tie:
            return None
        return 1 if self.votes_1 > self.votes_2 else 2

    def score(self, preferred: int) -> float:
        """Benchmark credit: 1 if the majority picks `preferred`, 0 if the other, 0.5 on a tie."""
        return 0.5 if self.winner is None else float(self.winner == preferred)


def is_swapped(comparison: Comparison, seed: int) -> bool:
    """The seeded, reproducible coin that decides whether response_2 is shown as Assistant 1."""
    key = json.dumps([seed, comparison.query, comparison.response_1, comparison.response_2])
    return hashlib.sha256(key.encode("utf-8")).digest()[0] & 1 == 1


class Judge:
    """Judges batches of comparisons through `generate`; counts the comparisons and samples it spent."""

    def __init__(
        self,
        generate: Callable,
        tokenizer,
        *,
        votes: int = 1,
        both_orders: bool = False,
        seed: int = 0,
        temperature: float = spec.EVAL_TEMPERATURE,
        top_p: float = spec.EVAL_TOP_P,
        top_k: int = spec.EVAL_TOP_K,
        max_new_tokens: int = spec.EVAL_MAX_NEW_TOKENS,
        max_think_tokens: int | None = None,
        batch_size: int = 64,
        chat_template: str | None = None,
        progress: bool = False,
    ):
        _check_options(votes=votes, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                       max_think_tokens=max_think_tokens, batch_size=batch_size)
        self.generate = generate
        self.tokenizer = tokenizer
        self.votes, self.both_orders, self.seed = votes, both_orders, seed
        self.decoding = dict(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                             max_think_tokens=max_think_tokens)
        self.batch_size, self.chat_template, self.progress = batch_size, chat_template, progress
        self.comparisons_judged = 0
        self.samples_drawn = 0
        self._generate_calls = 0  # each call gets its own sampler seed, so repeated rounds differ reproducibly

    def __call__(self, comparisons: Sequence[Comparison]) -> list[Judgment]:
        shown = []  # (comparison index, swapped) per prompt
        for index, c in enumerate(comparisons):
            orders = (False, True) if self.both_orders else (is_swapped(c, self.seed),)
            shown.extend((index, swapped) for swapped in orders)
        prompts = [self._prompt_ids(comparisons[index], swapped) for index, swapped in shown]
        texts = self._generate_all(prompts)

        judgments = [Judgment(verdicts=[], texts=[], swapped=[]) for _ in comparisons]
        for p, (index, swapped) in enumerate(shown):
            for text in texts[p * self.votes : (p + 1) * self.votes]:
                verdict = parse_verdict(text)
                if verdict is not None and swapped:
                    verdict = 3 - verdict
                judgments[index].verdicts.append(verdict)
                judgments[index].texts.append(text)
                judgments[index].swapped.append(swapped)
        self.comparisons_judged += len(comparisons)
        self.samples_drawn += len(texts)
        return judgments

    def _prompt_ids(self, c: Comparison, swapped: bool) -> list[int]:
        first, second = (c.response_2, c.response_1) if swapped else (c.response_1, c.response_2)
        return encode(self.tokenizer, render(self.tokenizer, c.query, first, second, chat_template=self.chat_template))

    def _generate_all(self, prompts: list[list[int]]) -> list[str]:
        """`votes` texts per prompt, prompt-major, from one sampler call over all prompts."""
        from tqdm import tqdm

        # Similar lengths share a sampler batch (less padding); results are put back in prompt order.
        order = sorted(range(len(prompts)), key=lambda p: len(prompts[p]))
        with tqdm(total=len(prompts), desc="judging", unit="prompt", disable=not self.progress, file=sys.stderr) as bar:
            results = self.generate([prompts[p] for p in order], num_samples=self.votes, seed=self.seed + self._generate_calls,
                                    batch_size=self.batch_size, progress=bar.update, **self.decoding)
        self._generate_calls += 1
        if len(results) != len(prompts) * self.votes:
            raise RuntimeError(f"generate returned {len(results)} results for {len(prompts)} prompts x {self.votes} samples")
        texts: list[str] = [""] * len(results)
        for position, p in enumerate(order):
            for v in range(self.votes):
                texts[p * self.votes + v] = results[position * self.votes + v].text
        return texts


def _check_options(*, votes, temperature, top_p, top_k, max_new_tokens, max_think_tokens, batch_size) -> None:
    problems = [
        (votes < 1, f"votes must be >= 1, got {votes}"),
        (temperature < 0, f"temperature must be >= 0, got {temperature}"),
        (not 0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}"),
        (top_k < 0, f"top_k must be >= 0 (0 = off), got {top_k}"),
        (max_new_tokens < 1, f"max_new_tokens must be >= 1, got {max_new_tokens}"),
        (max_think_tokens is not None and max_think_tokens < 1, f"max_think_tokens must be >= 1, got {max_think_tokens}"),
        (batch_size < 1, f"batch_size must be >= 1, got {batch_size}"),
    ]
    for bad, message in problems:
        if bad:
            raise UserError(message)


def load_backend(model_dir: str):
    """(generate, tokenizer) for a model folder: an HF folder or an rrm-jax checkpoint with its tokenizer files."""
    import rrm_jax
    from rrm_jax.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(model_dir)  # checked first: it is cheap, the model is not
    if tokenizer is None:
        raise UserError(f"{model_dir}: no tokenizer files; judging needs the model's tokenizer next to its weights")
    model, _ = rrm_jax.load_model(model_dir)
    return functools.partial(rrm_jax.sample, model, tokenizer=tokenizer), tokenizer


# ---------------------------------------------------------------------------------------------------
# Shared by the judge, rank and eval commands: judge flags, reading rows, writing results atomically.


def add_judge_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, voting and decoding flags common to `judge`, `rank` and `eval`."""
    parser.add_argument("--model", required=True, help="HF folder or rrm-jax checkpoint of the judge")
    parser.add_argument("--votes", type=int, default=1, help="samples per comparison; majority verdict (default 1)")
    parser.add_argument("--both-orders", action="store_true", help="judge each pair in both A/B orders (2x samples)")
    parser.add_argument("--seed", type=int, default=0, help="seed for A/B order, sampling and brackets (default 0)")
    parser.add_argument("--temperature", type=float, default=spec.EVAL_TEMPERATURE)
    parser.add_argument("--top-p", type=float, default=spec.EVAL_TOP_P)
    parser.add_argument("--top-k", type=int, default=spec.EVAL_TOP_K, help="0 = off")
    parser.add_argument("--max-new-tokens", type=int, default=spec.EVAL_MAX_NEW_TOKENS)
    parser.add_argument("--max-think-tokens", type=int, default=None, help="thinking budget: force </think> after M tokens")
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per compiled sampler batch (default 64)")
    parser.add_argument("--chat-template", default=None, help="use this named chat template (deepseek-r1-distill) "
                        "instead of the tokenizer's; needed when the tokenizer has none")


def judge_from_args(args: argparse.Namespace, *, progress: bool) -> Judge:
    options = dict(votes=args.votes, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                   max_new_tokens=args.max_new_tokens, max_think_tokens=args.max_think_tokens, batch_size=args.batch_size)
    _check_options(**options)  # before the (slow) model load
    chat_template = chat_template_named(args.chat_template) if args.chat_template else None
    generate, tokenizer = load_backend(args.model)
    return Judge(generate, tokenizer, both_orders=args.both_orders, seed=args.seed, chat_template=chat_template,
                 progress=progress, **options)


def read_rows(path: str) -> list[tuple[str, dict]]:
    """(location, row) for each row of a JSONL file, a JSON file holding a list of objects, or a Parquet file.

    The location ("FILE line N", "FILE item N" or "FILE row N") is what error messages about that row name.
    """
    if path.endswith(".parquet"):
        unit, numbered = "row", _parquet_rows(path)
    else:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e.strerror})") from None
        if text.lstrip().startswith("["):
            unit, numbered = "item", _json_list_rows(path, text)
        else:
            unit, numbered = "line", _jsonl_rows(path, text)
    for number, row in numbered:
        if not isinstance(row, dict):
            raise UserError(f"{path} {unit} {number}: expected a JSON object, got {type(row).__name__}")
    if not numbered:
        raise UserError(f"{path}: no rows")
    return [(f"{path} {unit} {number}", row) for number, row in numbered]


def _parquet_rows(path: str) -> list[tuple[int, dict]]:
    import pyarrow
    import pyarrow.parquet

    try:
        return list(enumerate(pyarrow.parquet.read_table(path).to_pylist(), start=1))
    except (OSError, pyarrow.ArrowException) as e:
        raise UserError(f"{path}: cannot read as Parquet ({e})") from None


def _json_list_rows(path: str, text: str) -> list[tuple[int, object]]:
    try:
        return list(enumerate(json.loads(text), start=1))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON at line {e.lineno}: {e.msg}") from None


def _jsonl_rows(path: str, text: str) -> list[tuple[int, object]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {number}: not valid JSON ({e.msg})") from None
    return rows


def require_text(where: str, row: dict, key: str, allowed: str) -> str:
    """row[key] as a string, or a UserError naming the row (`where`) and the fields rows need."""
    value = row.get(key)
    if not isinstance(value, str):
        problem = "missing field" if key not in row else "field must be a string:"
        raise UserError(f"{where}: {problem} {key!r} (rows need {allowed})")
    return value


def write_atomic(path: str, text: str) -> None:
    """Write via a temporary file in the same folder and rename, so no half-written output is left.
    In a multi-process run every process computes the same text and process 0 writes it."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{path}: output folder {folder} does not exist")
    if not distributed.is_main_process():
        return
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------------
# `rrm-jax judge`

_JUDGE_FIELDS = "query, response_1, response_2"


def configure(parser: argparse.ArgumentParser) -> None:
    add_judge_arguments(parser)
    parser.add_argument("--query", help="the instruction / question")
    parser.add_argument("--response-1", help="first candidate response")
    parser.add_argument("--response-2", help="second candidate response")
    parser.add_argument("--input", help=f"JSONL rows {{{_JUDGE_FIELDS}}} to judge")
    parser.add_argument("--output", help="JSONL file for the verdicts (with --input)")
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
    if args.input is not None:
        if any(v is not None for v in single):
            raise UserError("give either --input/--output or --query/--response-1/--response-2, not both")
        if args.output is None:
            raise UserError("--input needs --output FILE.jsonl for the verdicts")
        rows = read_rows(args.input)
        comparisons = [
            Comparison(*(require_text(where, row, k, _JUDGE_FIELDS) for k in ("query", "response_1", "response_2")))
            for where, row in rows
        ]
    else:
        if any(v is None for v in single):
            raise UserError("give --query, --response-1 and --response-2 (or --input FILE.jsonl --output FILE.jsonl)")
        if args.output is not None:
            raise UserError("--output goes with --input")
        rows, comparisons = None, [Comparison(*single)]

    judge = judge_from_args(args, progress=rows is not None)
    judgments = judge(comparisons)

    if rows is None:
        j = judgments[0]
        for number, (text, swapped) in enumerate(zip(j.texts, j.swapped), start=1):
            shown = "response 2 shown first" if swapped else "response 1 shown first"
            print(f"--- judgment {number}/{len(j.texts)} ({shown}) ---\n{text}\n")
        verdict = "tie" if j.winner is None else f"response {j.winner}"
        print(f"verdict: {verdict} (votes: response 1 {j.votes_1}, response 2 {j.votes_2}, unparseable {j.unparseable})")
        return 0

    lines = [json.dumps({**row, **judgment_record(j)}, ensure_ascii=False) for (_, row), j in zip(rows, judgments)]
    write_atomic(args.output, "\n".join(lines) + "\n")
    ties = sum(j.tie for j in judgments)
    unparseable = sum(j.unparseable for j in judgments)
    print(f"judged {len(judgments)} pairs ({judge.samples_drawn} samples): {ties} ties, {unparseable} unparseable samples "
          f"-> {args.output}")
    return 0
