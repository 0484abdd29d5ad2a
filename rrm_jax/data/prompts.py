"""Prompt-only data for policy training with a judge reward: rows `{prompt}` or `{prompt, reference}`.

Files as for preference data (.jsonl, .json, .parquet, or a Hugging Face dataset: rrm_jax.data.rows); a
bad row is one line naming `FILE line N`. A `PromptDataset` turns each row into the policy's prompt: the text through
the policy tokenizer's chat template as one user message (with the generation prompt), or the raw
text after BOS; rows whose prompt is longer than `max_prompt_len` tokens are dropped and counted.
Item i is a one-element list, so `rrm_jax.data.preference.preference_batches` streams it unchanged.
"""

from __future__ import annotations

import dataclasses

from rrm_jax.data.preference import token_counts
from rrm_jax.data.rows import read_rows
from rrm_jax.errors import UserError

PROMPT_FIELDS = ("prompt",)
OPTIONAL_FIELDS = ("reference",)


@dataclasses.dataclass(frozen=True)
class PromptRow:
    prompt: str  # the query: what the policy answers and what the judge sees as the question
    reference: str | None = None  # a reference response (reward.strategy=reference)
    origin: str = ""


@dataclasses.dataclass(frozen=True)
class PolicyPrompt:
    index: int  # the row's position in the dataset: every process can look a gathered batch up by it
    query: str
    reference: str | None
    prompt_ids: list[int]
    origin: str


def prompt_from_row(row: dict, origin: str) -> PromptRow:
    if "prompt" not in row:
        raise UserError(
            f"{origin}: a prompt row needs the field 'prompt' (optionally 'reference'); it has "
            f"{', '.join(sorted(row)) or 'none'}"
        )
    for key in ("prompt", "reference"):
        if key in row and row[key] is not None and not isinstance(row[key], str):
            raise UserError(f"{origin}: field {key!r} must be a string; got {type(row[key]).__name__}")
    return PromptRow(row["prompt"], row.get("reference"), origin)


def read_prompts(path: str, *, dataset_config: str | None = None, dataset_split: str | None = None) -> list[PromptRow]:
    rows = read_rows(
        path, dataset_config=dataset_config, dataset_split=dataset_split, allowed="'prompt' (optionally 'reference')"
    )
    return [prompt_from_row(row, origin) for origin, row in rows]


def policy_prompt_text(tokenizer, prompt: str, *, chat_template: bool) -> str:
    """The text the policy is prompted with (special tokens included, so encode it without adding them)."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return (tokenizer.bos_token or "") + prompt


class PromptDataset:
    def __init__(self, rows: list[PromptRow], *, tokenizer, max_prompt_len: int, chat_template: bool = True):
        if not rows:
            raise UserError("the prompt dataset is empty")
        self.rows, self.tokenizer, self.chat_template = rows, tokenizer, chat_template
        texts = [policy_prompt_text(tokenizer, r.prompt, chat_template=chat_template) for r in rows]
        self.kept = [i for i, n in enumerate(token_counts(tokenizer, texts)) if n <= max_prompt_len]
        self.dropped_over_length = len(rows) - len(self.kept)
        if not self.kept:
            raise UserError(
                f"all {len(rows)} prompts are longer than data.max_prompt_len={max_prompt_len} tokens; "
                f"raise data.max_prompt_len"
            )

    def __len__(self) -> int:
        return len(self.kept)

    def __getitem__(self, index: int) -> list[PolicyPrompt]:
        return [self.prompt(int(index))]

    def prompt(self, index: int) -> PolicyPrompt:
        row = self.rows[self.kept[index]]
        text = policy_prompt_text(self.tokenizer, row.prompt, chat_template=self.chat_template)
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return PolicyPrompt(index, row.prompt, row.reference, ids, row.origin)

    @property
    def prompts_per_item(self) -> int:
        return 1
