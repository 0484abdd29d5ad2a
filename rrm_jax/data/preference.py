"""Pairwise preference data: file readers -> one record type -> judge prompts -> a grain pipeline.

Rows come in two shapes, in JSONL, JSON (a list of objects) or Parquet files or a Hugging Face dataset
(all read by rrm_jax.data.rows):
    {"prompt": ..., "chosen": ..., "rejected": ...}
    {"query": ..., "response_1": ..., "response_2": ..., "label": 1 | 2}   (label = the better one)
Both become a `PreferencePair`. A `PreferenceDataset` shows each pair to the judge in a seeded
A/B order (or in both orders), renders the prompt with the render function it is given (for RRMs
`rrm_jax.rrm.prompt.render`), and drops prompts longer than `max_prompt_len`, counting them: a judge
must never see a truncated comparison. `preference_batches` streams it through grain: reshuffled
every epoch, one shard per JAX process, with an iterator state that goes into checkpoints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import grain
import jax
import numpy as np

from rrm_jax.data import sources
from rrm_jax.data.rows import read_rows
from rrm_jax.errors import UserError
from rrm_jax.rrm.prompt import PromptEncoder

PAIR_FIELDS = ("prompt", "chosen", "rejected")
LABELLED_FIELDS = ("query", "response_1", "response_2", "label")
ROW_SHAPES = f"{', '.join(PAIR_FIELDS)} or {', '.join(LABELLED_FIELDS)}"  # for messages
ORDERS = ("random", "both")

RenderFn = Callable[..., str]  # render(tokenizer, question, answer1, answer2) -> prompt text


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    query: str
    chosen: str  # the preferred response
    rejected: str
    origin: str = ""  # "FILE line N" (or "FILE row N" of Parquet, "DATASET row N"), for messages about this row


@dataclasses.dataclass(frozen=True)
class JudgeExample:
    """One prompt for the judge: a pair shown in a fixed A/B order."""

    query: str
    response_1: str
    response_2: str
    label: int  # position (1 or 2) of the preferred response
    prompt: str
    prompt_ids: list[int]
    origin: str


# ---------- reading ----------


def pair_from_row(row: dict, origin: str) -> PreferencePair:
    """Validate one row of either shape; a bad row is a UserError naming `origin` (FILE line N)."""
    if all(k in row for k in PAIR_FIELDS):
        fields = PAIR_FIELDS
    elif all(k in row for k in LABELLED_FIELDS):
        fields = LABELLED_FIELDS[:3]
        label = row["label"]
        if isinstance(label, bool) or label not in (1, 2):
            raise UserError(f"{origin}: label must be 1 or 2 (the better response); got {label!r}")
    else:
        raise UserError(f"{origin}: a row needs the fields {ROW_SHAPES}; it has {', '.join(sorted(row)) or 'none'}")
    for key in fields:
        if not isinstance(row[key], str):
            raise UserError(f"{origin}: field {key!r} must be a string; got {type(row[key]).__name__}")
    if fields == PAIR_FIELDS:
        return PreferencePair(row["prompt"], row["chosen"], row["rejected"], origin)
    better, worse = (
        (row["response_1"], row["response_2"]) if row["label"] == 1 else (row["response_2"], row["response_1"])
    )
    return PreferencePair(row["query"], better, worse, origin)


def _check_dataset_columns(source: str, config: str | None, split: str | None, columns: set[str]) -> None:
    """A dataset's columns against the two row shapes: one message for the dataset, not for its first row."""
    if not (set(PAIR_FIELDS) <= columns or set(LABELLED_FIELDS) <= columns):
        shape = max((PAIR_FIELDS, LABELLED_FIELDS), key=lambda fields: len(columns & set(fields)))
        missing = next(f for f in shape if f not in columns)
        raise UserError(
            f"{sources.describe(source, config, split)}: missing column {missing!r} (it has "
            f"{', '.join(sorted(columns))}; rows need {ROW_SHAPES})"
        )


def read_preferences(
    path: str, *, dataset_config: str | None = None, dataset_split: str | None = None
) -> list[PreferencePair]:
    """All pairs of a .jsonl, .json or .parquet file or of a Hugging Face dataset (rrm_jax.data.rows);
    an empty input or a bad row is a UserError."""
    rows = read_rows(path, dataset_config=dataset_config, dataset_split=dataset_split, allowed=ROW_SHAPES)
    if sources.is_dataset(path):
        _check_dataset_columns(path, dataset_config, dataset_split, set(rows[0][1]))
    return [pair_from_row(row, origin) for origin, row in rows]


def split_heldout(
    pairs: list[PreferencePair], heldout: int | float, *, seed: int
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held-out): `heldout` items (an int) or that fraction (a float in (0, 1)), chosen with `seed`."""
    n_heldout = round(heldout * len(pairs)) if isinstance(heldout, float) else int(heldout)
    if not 0 <= n_heldout < len(pairs) or (isinstance(heldout, float) and not 0 < heldout < 1):
        raise UserError(
            f"heldout={heldout} must leave some of the {len(pairs)} pairs for training (a count, or a fraction in (0, 1))"
        )
    order = np.random.default_rng(seed).permutation(len(pairs))
    return [pairs[i] for i in sorted(order[n_heldout:])], [pairs[i] for i in sorted(order[:n_heldout])]


# ---------- prompts ----------


def token_counts(tokenizer, texts: list[str]) -> list[int]:
    """Token counts of rendered prompts (no special tokens added)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer without offsets: several times faster than tokenizer(...)
        return [len(e.ids) for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


class PreferenceDataset:
    """Random-access judge prompts over pairs: item i is the list of prompts of the i-th kept pair.

    orders="random": one prompt per pair, its A/B order fixed by the i-th draw of a numpy PCG64
    stream seeded with `seed` (reproducible on every machine and process, unlike Python's hash()).
    orders="both": two prompts per pair, the preferred response first and then second (balanced
    batches; the toy recipe learns faster with them).
    Pairs with any prompt longer than max_prompt_len tokens are dropped and counted in
    `dropped_over_length`; prompts are rendered again on access, so memory stays at the raw text.
    Queries and responses are tokenized as plain text (rrm_jax.rrm.prompt.PromptEncoder); the control
    markers written in them are counted in `markers_neutralised`.
    """

    def __init__(
        self,
        pairs: list[PreferencePair],
        *,
        tokenizer,
        render: RenderFn,
        max_prompt_len: int,
        seed: int = 0,
        orders: str = "random",
    ):
        if orders not in ORDERS:
            raise UserError(f"orders={orders!r} is not supported; use one of {', '.join(ORDERS)}")
        if not pairs:
            raise UserError("the preference dataset is empty")
        self.tokenizer, self.render, self.max_prompt_len = tokenizer, render, max_prompt_len
        self.prompts = PromptEncoder(tokenizer, render_fn=render)
        if orders == "both":
            self._chosen_first = [(True, False)] * len(pairs)
        else:
            self._chosen_first = [(bool(c),) for c in np.random.default_rng(seed).random(len(pairs)) < 0.5]
        fits = np.ones(len(pairs), bool)
        chunk = 1024  # render and tokenize in chunks: fast batch tokenization, bounded memory
        for start in range(0, len(pairs), chunk):
            indices = range(start, min(start + chunk, len(pairs)))
            owners, shown = [], []
            for i in indices:
                for chosen_first in self._chosen_first[i]:
                    owners.append(i)
                    shown.append(self._shown(pairs[i], chosen_first))
            for i, ids in zip(owners, self.prompts.encode_batch(shown)):
                fits[i] &= len(ids) <= max_prompt_len
        self.markers_neutralised = self.prompts.neutralised
        self.pairs = pairs
        self.kept = np.flatnonzero(fits)
        self.dropped_over_length = int(len(pairs) - len(self.kept))
        if not len(self.kept):
            raise UserError(
                f"all {len(pairs)} preference pairs render to prompts longer than max_prompt_len={max_prompt_len} tokens; raise max_prompt_len"
            )

    @staticmethod
    def _shown(pair: PreferencePair, chosen_first: bool) -> tuple[str, str, str]:
        """(query, Assistant 1's response, Assistant 2's response)."""
        first, second = (pair.chosen, pair.rejected) if chosen_first else (pair.rejected, pair.chosen)
        return pair.query, first, second

    def __len__(self) -> int:
        return len(self.kept)

    def __getitem__(self, index: int) -> list[JudgeExample]:
        i = int(self.kept[index])
        pair = self.pairs[i]
        examples = []
        for chosen_first in self._chosen_first[i]:
            shown = self._shown(pair, chosen_first)
            text = self.render(self.tokenizer, *shown)
            examples.append(JudgeExample(*shown, 1 if chosen_first else 2, text, self.prompts(*shown), pair.origin))
        return examples

    @property
    def prompts_per_item(self) -> int:
        return len(self._chosen_first[0])


def preference_batches(
    dataset: PreferenceDataset,
    *,
    batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """An endless grain stream of this process's batches: lists of `batch_size / process_count` prompts.

    The whole dataset is shuffled with `seed` and reshuffled differently every epoch; global batch k
    is cut into process_count contiguous chunks and process i renders and tokenizes only chunk i, so
    the processes' batches of step k, concatenated in process order, are global batch k whatever
    the process count. `it = iter(stream)`; `it.get_state()` / `it.set_state(s)` save and restore
    the position, a count of batches that is also the same in every process.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    per_process, remainder = divmod(batch_size, process_count)
    if remainder or per_process % dataset.prompts_per_item:
        raise UserError(
            f"batch_size={batch_size} must split evenly into {process_count} process(es) of whole pairs "
            f"({dataset.prompts_per_item} prompt(s) per pair)"
        )
    stream = grain.MapDataset.source(dataset).seed(seed).shuffle().repeat(None)  # repeat() reseeds each epoch
    # batching is lazy: chunk c renders its items only when this process asks for it
    chunks = stream.batch(per_process // dataset.prompts_per_item, drop_remainder=True, batch_fn=_flatten)
    return chunks[process_index::process_count].to_iter_dataset()


def _flatten(items: list[list[JudgeExample]]) -> list[JudgeExample]:
    return [example for item in items for example in item]
