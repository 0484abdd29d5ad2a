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
- Sampling seeds: each judge call cuts its comparisons into a fixed batch plan (rrm_jax.worksplit) and
  samples batch b with the seed of (seed, call number, b): the votes of a comparison depend on the
  seed, --batch-size and the input, never on the number of processes or on interruptions.
- Several processes each sample their share of the batches on their own devices; every process gets
  every judgment. The `judge`, `eval` and `rank` commands keep the judgments in OUTPUT.partial as
  batches finish (`JudgmentLog`, rrm_jax.resumable) and continue from it with --resume.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence

from rrm_jax import distributed, model_identity, options, resumable, worksplit
from rrm_jax.data import sources
from rrm_jax.errors import Stopped, UserError
from rrm_jax.rrm import spec
from rrm_jax.rrm.prompt import PromptEncoder, chat_template_named, parse_verdict


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
    """Judges batches of comparisons through `generate`; counts the comparisons and samples it spent.

    Each call's comparisons are cut into a fixed batch plan (`worksplit.plan_batches`: similar prompt
    lengths together, at most `batch_size` prompts per batch, a comparison's prompts in one batch), each
    batch sampled with its own seed from (seed, call number, batch number). On several processes
    each one samples its share of the batches and all of them get every judgment. With a `journal`
    (`JudgmentLog`), comparisons it already holds are not judged again and new ones are recorded
    batch by batch; `stop_requested` is polled after each round of batches (see worksplit)."""

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
        max_new_tokens: int | None = spec.EVAL_MAX_NEW_TOKENS,  # None: as load_backend's generate decides
        max_think_tokens: int | None = None,
        batch_size: int = 64,
        prompts_per_call: int | None = None,
        chat_template: str | None = None,
        progress: bool = False,
        journal: "JudgmentLog | None" = None,
        stop_requested: Callable[[], bool] | None = None,
    ):
        _check_options(votes=votes, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                       max_think_tokens=max_think_tokens, batch_size=batch_size)
        self.generate = generate
        self.tokenizer = tokenizer
        self.votes, self.both_orders, self.seed = votes, both_orders, seed
        self.decoding = dict(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                             max_think_tokens=max_think_tokens)
        self.batch_size, self.chat_template, self.progress = batch_size, chat_template, progress
        self.prompts = PromptEncoder(tokenizer, chat_template=chat_template)  # counts the markers it neutralised
        self.prompts_per_call = prompts_per_call or options.CALL_BATCHES * batch_size
        self.journal, self.stop_requested = journal, stop_requested
        self.comparisons_judged = 0  # sampled by this run, over all processes (not those from the journal)
        self.samples_drawn = 0
        self._calls = 0  # each call seeds its batches with its own number, so repeated rounds differ reproducibly

    def __call__(self, comparisons: Sequence[Comparison]) -> list[Judgment]:
        call = self._calls
        self._calls += 1
        orders = [(False, True) if self.both_orders else (is_swapped(c, self.seed),) for c in comparisons]
        prompts = [[self._prompt_ids(c, swapped) for swapped in o] for c, o in zip(comparisons, orders)]
        judgments: list[Judgment | None] = [
            self.journal.get(call, i) if self.journal is not None else None for i in range(len(comparisons))]
        plan = worksplit.plan_batches([max(map(len, p)) for p in prompts], [len(p) for p in prompts],
                                     self.prompts_per_call)
        todo = [b for b, items in enumerate(plan) if any(judgments[i] is None for i in items)]

        with self._progress_bar(prompts, judgments) as bar:

            def on_round(finished: list[tuple[int, list[list[str]]]]) -> None:
                new = []
                for b, texts in finished:
                    for i, item_texts in zip(plan[b], texts):
                        self.comparisons_judged += 1
                        self.samples_drawn += len(item_texts)
                        bar.update(len(prompts[i]))
                        if judgments[i] is None:  # (a batch re-run after a cut-short partial file keeps what it had)
                            judgments[i] = judgment_from_texts(item_texts, orders[i], self.votes)
                            new.append((i, judgments[i]))
                if self.journal is not None:
                    self.journal.record(call, new)

            worksplit.run_rounds(todo, lambda b: self._sample(call, b, [prompts[i] for i in plan[b]]), on_round,
                                 stop_requested=self.stop_requested)
        return judgments

    def _sample(self, call: int, batch: int, item_prompts: list[list[list[int]]]) -> list[list[str]]:
        """The texts of one planned batch, per comparison: `votes` per shown order, in order."""
        flat = [p for prompts in item_prompts for p in prompts]
        results = self.generate(flat, num_samples=self.votes, seed=worksplit.batch_seed(self.seed, call, batch),
                                batch_size=self.batch_size, progress=None, **self.decoding)
        if len(results) != len(flat) * self.votes:
            raise RuntimeError(f"generate returned {len(results)} results for {len(flat)} prompts x {self.votes} samples")
        texts, start = [], 0
        for prompts in item_prompts:  # results are prompt-major
            texts.append([r.text for r in results[start:start + len(prompts) * self.votes]])
            start += len(prompts) * self.votes
        return texts

    def _progress_bar(self, prompts: list[list[list[int]]], judgments: list[Judgment | None]):
        from tqdm import tqdm

        done = sum(len(p) for p, j in zip(prompts, judgments) if j is not None)
        return tqdm(total=sum(map(len, prompts)), initial=done, desc="judging", unit="prompt", file=sys.stderr,
                    disable=not (self.progress and distributed.is_main_process()))

    def _prompt_ids(self, c: Comparison, swapped: bool) -> list[int]:
        first, second = (c.response_2, c.response_1) if swapped else (c.response_1, c.response_2)
        return self.prompts(c.query, first, second)


def warn_neutralised(judge: Judge) -> None:
    """One line on stderr when control markers written in the inputs were tokenized as plain text."""
    if judge.prompts.neutralised and distributed.is_main_process():
        print(f"warning: {judge.prompts.neutralised} control markers (such as <｜User｜>, </think> or the "
              f"end-of-sentence token) written in queries or responses were tokenized as plain text, not as "
              f"control tokens", file=sys.stderr)


def judgment_from_texts(texts: list[str], orders: tuple[bool, ...], votes: int) -> Judgment:
    """The judgment of one comparison from its texts (`votes` per shown order, in order)."""
    j = Judgment(verdicts=[], texts=[], swapped=[])
    for k, text in enumerate(texts):
        swapped = orders[k // votes]
        verdict = parse_verdict(text)
        if verdict is not None and swapped:
            verdict = 3 - verdict
        j.verdicts.append(verdict)
        j.texts.append(text)
        j.swapped.append(swapped)
    return j


class JudgmentLog:
    """The judgments of a run, kept in its partial file: one record per judged comparison, keyed by
    the judge call (rank: the tournament round) and the comparison's index in that call."""

    def __init__(self, partial: resumable.PartialFile):
        self.partial = partial
        self._done = {(r["call"], r["index"]): Judgment(r["verdicts"], r["texts"], r["swapped"]) for r in partial.records}

    def __len__(self) -> int:
        return len(self._done)

    def get(self, call: int, index: int) -> Judgment | None:
        return self._done.get((call, index))

    def record(self, call: int, judged: list[tuple[int, Judgment]]) -> None:
        for index, j in judged:
            self._done[(call, index)] = j
        self.partial.append([{"call": call, "index": index, "verdicts": j.verdicts, "texts": j.texts,
                              "swapped": j.swapped} for index, j in judged])


def _check_options(*, votes, temperature, top_p, top_k, max_new_tokens, max_think_tokens, batch_size) -> None:
    problems = [
        (votes < 1, f"votes must be >= 1, got {votes}"),
        (temperature < 0, f"temperature must be >= 0, got {temperature}"),
        (not 0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}"),
        (top_k < 0, f"top_k must be >= 0 (0 = off), got {top_k}"),
        (max_new_tokens is not None and max_new_tokens < 1, f"max_new_tokens must be >= 1, got {max_new_tokens}"),
        (max_think_tokens is not None and max_think_tokens < 1, f"max_think_tokens must be >= 1, got {max_think_tokens}"),
        (batch_size < 1, f"batch_size must be >= 1, got {batch_size}"),
    ]
    for bad, message in problems:
        if bad:
            raise UserError(message)


def load_backend(model_dir: str, *, mesh_shape: tuple[int, int, int] | None = None):
    """(generate, tokenizer) for a model folder: an HF folder or an rrm-jax checkpoint with its tokenizer files.

    The model goes onto this process's own devices: its first one, or a mesh of `mesh_shape`
    (data, fsdp, tp; -1 = the remaining devices) over all of them."""
    import rrm_jax
    from rrm_jax.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(model_dir)  # checked first: it is cheap, the model is not
    if tokenizer is None:
        raise UserError(f"{model_dir}: no tokenizer files; judging needs the model's tokenizer next to its weights")
    model, _ = rrm_jax.load_model(model_dir, mesh=options.local_mesh(mesh_shape))
    return functools.partial(sample_within_context, model, tokenizer=tokenizer), tokenizer


def sample_within_context(model, prompt_ids, *, max_new_tokens, **kw):
    """`rrm_jax.sample`; max_new_tokens=None means the published evaluations' 8192, capped per prompt at
    what the model's context leaves (so a small model, like the toy judge, works with the defaults)."""
    import rrm_jax

    if max_new_tokens is None:
        context = model.config.max_position_embeddings
        max_new_tokens = [max(1, min(spec.EVAL_MAX_NEW_TOKENS, context - len(p))) for p in prompt_ids]
    return rrm_jax.sample(model, prompt_ids, max_new_tokens=max_new_tokens, **kw)


# ---------------------------------------------------------------------------------------------------
# Shared by the judge, rank and eval commands: judge flags, reading rows, resumable output.


def add_judge_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, voting and decoding flags common to `judge`, `rank` and `eval`."""
    parser.add_argument("--model", required=True, help="HF folder or rrm-jax checkpoint of the judge")
    parser.add_argument("--votes", type=int, default=1, help="samples per comparison; majority verdict")
    parser.add_argument("--both-orders", action="store_true", help="judge each pair in both A/B orders (2x samples)")
    parser.add_argument("--seed", type=int, default=0, help="seed for A/B order, sampling and brackets")
    parser.add_argument("--temperature", type=float, default=spec.EVAL_TEMPERATURE, help="sampling temperature")
    parser.add_argument("--top-p", type=float, default=spec.EVAL_TOP_P, help="nucleus sampling mass")
    parser.add_argument("--top-k", type=int, default=spec.EVAL_TOP_K, help="top-k filter, 0 = off")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"tokens generated per sample (default: {spec.EVAL_MAX_NEW_TOKENS} as in the published "
                             f"evaluations, capped per prompt at what the model's context leaves)")
    parser.add_argument("--max-think-tokens", type=int, default=None, help="thinking budget: force </think> after M tokens (default: no budget)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="prompts decoding at once (the engine's slots hold their votes)")
    options.add_prompts_per_call_argument(parser)
    parser.add_argument("--chat-template", default=None, help="use this named chat template (deepseek-r1-distill) "
                        "instead of the tokenizer's; needed when the tokenizer has none (default: the tokenizer's)")
    options.add_mesh_argument(parser)


def judge_from_args(args: argparse.Namespace, *, progress: bool, journal: JudgmentLog | None = None,
                    stop_requested: Callable[[], bool] | None = None, model: str | None = None) -> Judge:
    """The Judge of the command line's flags; `model`: the folder to load instead of --model (the one
    a journal recorded)."""
    decoding = dict(votes=args.votes, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                   max_new_tokens=args.max_new_tokens, max_think_tokens=args.max_think_tokens, batch_size=args.batch_size)
    _check_options(**decoding)  # before the (slow) model load
    chat_template = chat_template_named(args.chat_template) if args.chat_template else None
    generate, tokenizer = load_backend(model or args.model, mesh_shape=args.mesh)
    return Judge(generate, tokenizer, both_orders=args.both_orders, seed=args.seed, chat_template=chat_template,
                 prompts_per_call=options.prompts_per_call(args), progress=progress, journal=journal, stop_requested=stop_requested, **decoding)


def judge_settings(args: argparse.Namespace, rows: list[tuple[str, dict]], **extra) -> dict:
    """What a judging run's results depend on: stored in its partial file, compared on --resume."""
    return {"model": os.path.abspath(args.model) if os.path.exists(args.model) else args.model,
            **options.input_settings(args, rows), "votes": args.votes, "both_orders": args.both_orders, "seed": args.seed,
            "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
            "max_new_tokens": args.max_new_tokens, "max_think_tokens": args.max_think_tokens,
            "batch_size": args.batch_size, "prompts_per_call": options.prompts_per_call(args),
            "chat_template": args.chat_template, **extra}


def read_rows(path: str, *, dataset_config: str | None = None, dataset_split: str | None = None,
              columns: tuple[str, ...] = (), allowed: str = "") -> list[tuple[str, dict]]:
    """(location, row) for each row of a JSONL file, a JSON file holding a list of objects, a Parquet
    file, or a Hugging Face dataset (rrm_jax.data.sources; `columns` are checked there up front).

    The location ("FILE line N", "FILE item N", "FILE row N" or "DATASET row N") is what error messages
    about that row name.
    """
    if sources.is_dataset(path):
        return sources.load_rows(path, config=dataset_config, split=dataset_split, columns=columns, allowed=allowed)
    if dataset_config or dataset_split:
        raise UserError(f"{path} is a file: --dataset-config / --dataset-split are for datasets")
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


def rows_from_args(args: argparse.Namespace, columns: tuple[str, ...], allowed: str) -> list[tuple[str, dict]]:
    return read_rows(args.input, dataset_config=args.dataset_config, dataset_split=args.dataset_split,
                     columns=columns, allowed=allowed)


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


def open_journal(args: argparse.Namespace, command: str, settings: dict, model: dict) -> JudgmentLog:
    """The JudgmentLog of a command writing args.output, on its partial file (resumed with --resume);
    model: `model_identity.identify(args.model)`."""
    return JudgmentLog(resumable.PartialFile(args.output, command, settings, resume=args.resume, model=model))


def run_journaled(args: argparse.Namespace, command: str, settings: dict, what: str, work: Callable):
    """`work(judge)` with its judgments journaled in OUTPUT.partial (`--resume` skips them) and SIGTERM /
    Ctrl-C honoured after the in-flight batch. -> (journal, judge, work's result); the caller finishes the
    journal's partial file. Raises resumable.Stopped after a signal (the line saying so printed)."""
    model = model_identity.identify(args.model)  # the step a run folder resolves to now, loaded below
    with resumable.StopSignals() as stop:
        journal = open_journal(args, command, settings, model)
        try:
            judge = judge_from_args(args, progress=True, journal=journal, stop_requested=stop.requested,
                                    model=model["path"])
            result = work(judge)
            warn_neutralised(judge)
            return journal, judge, result
        except resumable.Interrupted:
            if distributed.is_main_process():
                print(f"{stop.name}: stopped with {len(journal)} {what} finished in {journal.partial.path}; "
                      f"run the same command with --resume to continue", file=sys.stderr)
            raise Stopped(stop.exit_code) from None
        finally:
            journal.partial.close()


# ---------------------------------------------------------------------------------------------------
# `rrm-jax judge`

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
                print(f"--- judgment {number}/{len(j.texts)} (Assistant 1 = response {first}, Assistant 2 = "
                      f"response {second}) ---\n{text}\n")
                print(f"=> vote {number}: " + (f"response {verdict}" if verdict else "unparseable") + "\n")
            verdict = "tie" if j.winner is None else f"response {j.winner}"
            print(f"verdict: {verdict} (votes: response 1 {j.votes_1}, response 2 {j.votes_2}, unparseable {j.unparseable})")
        return 0

    if any(v is not None for v in single):
        raise UserError("give either --input/--output or --query/--response-1/--response-2, not both")
    if args.output is None:
        raise UserError("--input needs --output FILE.jsonl for the verdicts")
    rows = rows_from_args(args, _JUDGE_COLUMNS, _JUDGE_FIELDS)
    comparisons = [Comparison(*(require_text(where, row, k, _JUDGE_FIELDS) for k in _JUDGE_COLUMNS)) for where, row in rows]
    journal, judge, judgments = run_journaled(args, "judge", judge_settings(args, rows), "pairs",
                                              lambda judge: judge(comparisons))
    lines = [json.dumps({**row, **judgment_record(j)}, ensure_ascii=False, default=str) for (_, row), j in zip(rows, judgments)]
    journal.partial.finish("\n".join(lines) + "\n")
    if distributed.is_main_process():
        ties = sum(j.tie for j in judgments)
        unparseable = sum(j.unparseable for j in judgments)
        resumed = len(judgments) - judge.comparisons_judged
        print(f"judged {len(judgments)} pairs ({judge.samples_drawn} samples{f'; {resumed} pairs from the partial file' if resumed else ''}): "
              f"{ties} ties, {unparseable} unparseable samples -> {args.output}")
    return 0
