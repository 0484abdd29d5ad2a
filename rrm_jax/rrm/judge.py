"""Batched pairwise judging with an RRM: position randomisation, voting, thinking budget.

This module is the judging library: `Comparison`, `Judgment`, `Judge`, the judgments' journal in a
run's partial file (`JudgmentJournal`) and the model backend (`load_backend`). The flags and plumbing
the `judge`, `rank` and `eval` commands share are in rrm_jax.rrm.judge_commands, the `rrm-jax judge`
command in rrm_jax.rrm.judge_cli, the input rows' reader in rrm_jax.data.rows.

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
- Decoding (`rrm_jax.decoding.Decoding`) defaults to that of the published evaluations (`EVAL_DECODING`:
  temperature 0.6, top_p 1.0, no top-k, 8192 new tokens); `max_think_tokens` is passed to the sampler,
  which forces `</think>` there.
- Sampling seeds: each judge call cuts its comparisons into a fixed batch plan (rrm_jax.worksplit) and
  samples batch b with the seed of (seed, call number, b): the votes of a comparison depend on the
  seed, --batch-size and the input, never on the number of processes or on interruptions.
- Several processes each sample their share of the batches on their own devices; every process gets
  every judgment. The `judge`, `eval` and `rank` commands keep the judgments in OUTPUT.partial as
  batches finish (`JudgmentJournal`, rrm_jax.resumable) and continue from it with --resume.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rrm_jax import distributed, options, resumable, worksplit
from rrm_jax.decoding import Decoding
from rrm_jax.errors import UserError
from rrm_jax.rrm import spec
from rrm_jax.rrm.prompt import PromptEncoder, parse_verdict

# the decoding of the published evaluations
EVAL_DECODING = Decoding(
    temperature=spec.EVAL_TEMPERATURE,
    top_p=spec.EVAL_TOP_P,
    top_k=spec.EVAL_TOP_K,
    max_new_tokens=spec.EVAL_MAX_NEW_TOKENS,
)


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
    (`JudgmentJournal`), comparisons it already holds are not judged again and new ones are recorded
    batch by batch; `stop_requested` is polled after each round of batches (see worksplit).

    Decoding: `decoding` (default `EVAL_DECODING`), with any of its fields given as a keyword replacing
    its value (`Judge(generate, tok, votes=5, max_think_tokens=2048)`); max_new_tokens=None leaves the
    length to `generate` (load_backend's: 8192 capped per prompt at the model's context). kv_pool_gb: the
    engine's KV page pool per device (`rrm_jax.sample`), which bounds the rows decoding at once by the
    tokens they hold; the judgments do not depend on it."""

    def __init__(
        self,
        generate: Callable,
        tokenizer,
        *,
        votes: int = 1,
        both_orders: bool = False,
        seed: int = 0,
        decoding: Decoding = EVAL_DECODING,
        batch_size: int = 64,
        prompts_per_call: int | None = None,
        kv_pool_gb: float | None = None,
        chat_template: str | None = None,
        progress: bool = False,
        journal: JudgmentJournal | None = None,
        stop_requested: Callable[[], bool] | None = None,
        **decoding_fields,
    ):
        self.decoding = dataclasses.replace(decoding, **decoding_fields)  # validated
        check_votes_and_batch_size(votes, batch_size)
        self.generate = generate
        self.tokenizer = tokenizer
        self.votes, self.both_orders, self.seed = votes, both_orders, seed
        self.batch_size, self.chat_template, self.progress = batch_size, chat_template, progress
        self.prompts = PromptEncoder(tokenizer, chat_template=chat_template)  # counts the markers it neutralised
        self.prompts_per_call = prompts_per_call or options.CALL_BATCHES * batch_size
        # the sampler's KV page pool (results do not depend on it); passed only when set, so a stand-in
        # sampler without the keyword still works
        self.pool = {} if kv_pool_gb is None else {"kv_pool_gb": kv_pool_gb}
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
            self.journal.get(call, i) if self.journal is not None else None for i in range(len(comparisons))
        ]
        plan = worksplit.plan_batches(
            [max(map(len, p)) for p in prompts], [len(p) for p in prompts], self.prompts_per_call
        )
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

            worksplit.run_rounds(
                todo,
                lambda b: self._sample(call, b, [prompts[i] for i in plan[b]]),
                on_round,
                stop_requested=self.stop_requested,
            )
        return judgments

    def _sample(self, call: int, batch: int, item_prompts: list[list[list[int]]]) -> list[list[str]]:
        """The texts of one planned batch, per comparison: `votes` per shown order, in order."""
        flat = [p for prompts in item_prompts for p in prompts]
        results = self.generate(
            flat,
            num_samples=self.votes,
            seed=worksplit.batch_seed(self.seed, call, batch),
            batch_size=self.batch_size,
            progress=None,
            **self.pool,
            **self.decoding.options(),
        )
        if len(results) != len(flat) * self.votes:
            raise RuntimeError(
                f"generate returned {len(results)} results for {len(flat)} prompts x {self.votes} samples"
            )
        texts, start = [], 0
        for prompts in item_prompts:  # results are prompt-major
            texts.append([r.text for r in results[start : start + len(prompts) * self.votes]])
            start += len(prompts) * self.votes
        return texts

    def _progress_bar(self, prompts: list[list[list[int]]], judgments: list[Judgment | None]):
        from tqdm import tqdm

        done = sum(len(p) for p, j in zip(prompts, judgments) if j is not None)
        return tqdm(
            total=sum(map(len, prompts)),
            initial=done,
            desc="judging",
            unit="prompt",
            file=sys.stderr,
            disable=not (self.progress and distributed.is_main_process()),
        )

    def _prompt_ids(self, c: Comparison, swapped: bool) -> list[int]:
        first, second = (c.response_2, c.response_1) if swapped else (c.response_1, c.response_2)
        return self.prompts(c.query, first, second)


def warn_neutralised(judge: Judge) -> None:
    """One line on stderr when control markers written in the inputs were tokenized as plain text."""
    if judge.prompts.neutralised and distributed.is_main_process():
        print(
            f"warning: {judge.prompts.neutralised} control markers (such as <｜User｜>, </think> or the "
            f"end-of-sentence token) written in queries or responses were tokenized as plain text, not as "
            f"control tokens",
            file=sys.stderr,
        )


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


class JudgmentJournal:
    """The judgments of a run, journaled in its partial file: one record per judged comparison, keyed by
    the judge call (rank: the tournament round) and the comparison's index in that call."""

    def __init__(self, partial: resumable.PartialFile):
        self.partial = partial
        self._done = {
            (r["call"], r["index"]): Judgment(r["verdicts"], r["texts"], r["swapped"]) for r in partial.records
        }

    def __len__(self) -> int:
        return len(self._done)

    def get(self, call: int, index: int) -> Judgment | None:
        return self._done.get((call, index))

    def record(self, call: int, judged: list[tuple[int, Judgment]]) -> None:
        for index, j in judged:
            self._done[(call, index)] = j
        self.partial.append(
            [
                {"call": call, "index": index, "verdicts": j.verdicts, "texts": j.texts, "swapped": j.swapped}
                for index, j in judged
            ]
        )


def check_votes_and_batch_size(votes: int, batch_size: int) -> None:
    if votes < 1:
        raise UserError(f"votes must be >= 1, got {votes}")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")


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
