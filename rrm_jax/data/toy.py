"""The embedded "banned letter" safety-judging task that `rrm-jax train` learns with no config.

Each item: the query names a banned letter X ("avoid x"); both responses are 5 random letters
other than X, except that one of them carries X at one random position; the preferred response is
the one WITHOUT X. Neither response alone tells which is preferred: the judge must read X and look
for it in both. The item space is about 26^11, so training and held-out items never overlap.

The toy judge speaks the RRM format with a character tokenizer and its own short prompt: its chat
template recognises the RRM user message (rrm_jax.rrm.prompt.messages) and compresses it to

    <s>avoid x:abcde|fghij<think>        (query : response 1 | response 2; 16 tokens, "avoid " is one)

so `rrm_jax.rrm.prompt.render`, `rrm-jax judge` and `rrm-jax eval` work on a toy checkpoint
unchanged. The answer is `</think>\\boxed{Assistant k}</s>`: empty thinking and a one-token verdict
that the RRM parser reads.
"""

from __future__ import annotations

import json
import os
import re
import string

import numpy as np
from tokenizers import AddedToken

from rrm_jax.data.char_tokenizer import BOXED_OPEN, VERDICT_TOKENS, build_char_tokenizer
from rrm_jax.data.preference import PreferencePair
from rrm_jax.rrm import prompt, spec

LETTERS = string.ascii_lowercase
RESPONSE_LENGTH = 5
# X is drawn from the last BANNED_CHOICES letters: all 26, the measured recipe's task (BENCHMARKS.md).
BANNED_CHOICES = 26
SPLITS = {"train": 0, "heldout": 1}  # independent random streams per split
TOY_USER_FORMAT = "{question}:{answer1}|{answer2}"


def _rrm_user_markers() -> tuple[str, str, str, str]:
    """The fixed text around question, answer1 and answer2 in the RRM user message."""
    before_q, after_q, after_a1, after_a2 = re.split(r"\{question\}|\{answer1\}|\{answer2\}", spec.USER_TEMPLATE)
    assert (
        spec.USER_TEMPLATE.index("{question}")
        < spec.USER_TEMPLATE.index("{answer1}")
        < spec.USER_TEMPLATE.index("{answer2}")
    )
    return before_q, after_q, after_a1, after_a2 + spec.USER_SUFFIX


def _toy_chat_template() -> str:
    q_open, a1_open, a2_open, tail = (json.dumps(m) for m in _rrm_user_markers())
    return (
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- set c = message['content'] -%}"
        f"{{%- if c.startswith({q_open}) and {a1_open} in c and {a2_open} in c and c.endswith({tail}) -%}}"
        # an RRM comparison: keep the query and the two responses, drop the instructions
        f"{{%- set rest = c[{q_open}|length:c|length - {tail}|length] -%}}"
        f"{{%- set question = rest.split({a1_open})[0] -%}}"
        f"{{%- set rest = rest[question|length + {a1_open}|length:] -%}}"
        f"{{%- set answer1 = rest.split({a2_open})[0] -%}}"
        f"{{%- set answer2 = rest[answer1|length + {a2_open}|length:] -%}}"
        f"{{{{- {json.dumps(TOY_USER_FORMAT)}.format(question=question, answer1=answer1, answer2=answer2) -}}}}"
        "{%- else -%}{{- c -}}{%- endif -%}"
        "{%- elif message['role'] == 'assistant' -%}"
        f"{{{{- {json.dumps(spec.THINK_OPEN)} + message['content'] + eos_token -}}}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{ {json.dumps(spec.THINK_OPEN)} }}}}{{%- endif -%}}"
    )


TOY_CHAT_TEMPLATE = _toy_chat_template()


# The query's fixed words are one token, so the prompt is 16 tokens as in the measured recipe's
# prototype (BOS, marker, X, separator, 5 letters, separator, 5 letters, <think>): BENCHMARKS.md.
QUERY_PREFIX = "avoid "


def toy_tokenizer():
    """The toy's character tokenizer with its chat template (save it with the checkpoint)."""
    tokenizer = build_char_tokenizer(chat_template=TOY_CHAT_TEMPLATE)
    tokenizer.add_tokens([AddedToken(QUERY_PREFIX, special=False, normalized=False)])
    return tokenizer


def render_toy(tokenizer, question: str, answer1: str, answer2: str) -> str:
    """Exactly what `rrm_jax.rrm.prompt.render` gives with the toy tokenizer, about 100x faster
    (no chat-template machinery); the tests hold the two equal. Use it to render toy data in bulk."""
    return (
        tokenizer.bos_token
        + TOY_USER_FORMAT.format(question=question, answer1=answer1, answer2=answer2)
        + spec.THINK_OPEN
    )


def question_for(letter: str) -> str:
    return QUERY_PREFIX + letter


def _draw_pairs(rng: np.random.Generator, n: int) -> list[PreferencePair]:
    # Row i of one uniform draw decides item i alone, so the first k items do not depend on n.
    u = rng.random((n, 2 + 2 * RESPONSE_LENGTH))
    banned = len(LETTERS) - BANNED_CHOICES + (u[:, 0] * BANNED_CHOICES).astype(np.int64)
    # two responses from the 25 letters other than X: draw from 25 symbols, skip over X
    letters = (u[:, 1:-1] * (len(LETTERS) - 1)).astype(np.int64).reshape(n, 2, RESPONSE_LENGTH)
    letters += letters >= banned[:, None, None]
    letters[np.arange(n), 1, (u[:, -1] * RESPONSE_LENGTH).astype(np.int64)] = banned  # response 2 gets X
    # letter indices -> ASCII bytes -> one 5-byte string per response, without a Python loop per letter
    words = (letters + ord(LETTERS[0])).astype(np.uint8).view(f"S{RESPONSE_LENGTH}")[..., 0]
    return [
        PreferencePair(
            query=question_for(LETTERS[x]), chosen=good.decode(), rejected=bad.decode(), origin=f"toy item {i}"
        )
        for i, (x, (good, bad)) in enumerate(zip(banned.tolist(), words))
    ]


def make_toy_pairs(n: int, seed: int, *, split: str = "train") -> list[PreferencePair]:
    """n items of the toy task, reproducible from (seed, split); the splits never share a stream."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}")
    return _draw_pairs(np.random.default_rng([seed, SPLITS[split]]), n)


def verdict_completion(tokenizer, verdict: int) -> str:
    """The toy judge's whole answer for verdict 1 or 2, end-of-sequence token included."""
    return spec.THINK_CLOSE + BOXED_OPEN + VERDICT_TOKENS[verdict - 1] + "}" + tokenizer.eos_token


def format_warmup_batch(
    tokenizer, batch_size: int, rng: np.random.Generator, *, true_verdicts: bool = False
) -> dict[str, np.ndarray]:
    """Phase A of the recipe: supervised transcripts that teach the answer FORMAT only.

    Fresh toy items in random A/B order, each followed by a RANDOM verdict, so a model trained on
    them writes well-formed verdicts while its accuracy stays at chance: any later climb in accuracy
    comes from the GRPO reward alone.

    true_verdicts=True writes the CORRECT verdict instead: plain supervised learning of the task, a
    diagnostic of what the model can learn (benchmarks/toy_init.py), never used by the trainer.

    Returns tokens [B, T] int32 (prompt then answer, right-padded with pad ids) and loss_mask [B, T]
    float32, 1 where tokens[b, t] is an answer token (to be predicted from position t - 1).
    """
    rows, masks = [], []
    for pair in _draw_pairs(rng, batch_size):
        chosen_first = rng.random() < 0.5
        first, second = (pair.chosen, pair.rejected) if chosen_first else (pair.rejected, pair.chosen)
        prompt_ids = prompt.encode(tokenizer, render_toy(tokenizer, pair.query, first, second))
        coin = int(rng.integers(1, 3))  # drawn either way, so both modes see the same items
        verdict = (1 if chosen_first else 2) if true_verdicts else coin
        answer_ids = tokenizer(verdict_completion(tokenizer, verdict), add_special_tokens=False)["input_ids"]
        rows.append(prompt_ids + answer_ids)
        masks.append([0.0] * len(prompt_ids) + [1.0] * len(answer_ids))
    width = max(map(len, rows))
    tokens = np.full((batch_size, width), tokenizer.pad_token_id, np.int32)
    loss_mask = np.zeros((batch_size, width), np.float32)
    for b, (row, mask) in enumerate(zip(rows, masks)):
        tokens[b, : len(row)] = row
        loss_mask[b, : len(mask)] = mask
    return {"tokens": tokens, "loss_mask": loss_mask}


def write_heldout(path: str, n: int = 500, seed: int = 0) -> str:
    """Write n held-out toy items as `{prompt, chosen, rejected}` JSONL rows (`rrm-jax eval --format pairs`)."""
    from rrm_jax import resumable

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    resumable.write_output(
        path,
        "".join(
            json.dumps({"prompt": p.query, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
            for p in make_toy_pairs(n, seed, split="heldout")
        ),
    )
    return path


# ---------- the policy task of `make demo-policy` ----------
# A policy answers a toy query ("avoid x") with a 5-letter string; its only reward is the toy judge's
# verdicts between the samples of a group. Prompt: BOS + the query as raw text (data.chat_template=false).


def policy_rows(n: int, seed: int, *, split: str = "train"):
    """n policy prompts (`PromptRow`s) from the toy items of (seed, split); the reference is the clean response."""
    from rrm_jax.data.prompts import PromptRow

    return [PromptRow(p.query, p.chosen, p.origin) for p in make_toy_pairs(n, seed, split=split)]


def banned_letter(query: str) -> str:
    return query[len(QUERY_PREFIX) :]


def policy_warmup_batch(
    tokenizer, batch_size: int, rng: np.random.Generator, *, banned_fraction: float = 0.75
) -> dict[str, np.ndarray]:
    """Supervised transcripts that teach the policy the answer FORMAT (5 letters, then </s>) but not the
    task: a response carries the banned letter with probability `banned_fraction`, so the policy starts
    writing it about that often and only the judge's reward can teach it to stop. Same layout as
    `format_warmup_batch`."""
    rows, masks = [], []
    for pair in _draw_pairs(rng, batch_size):
        response = pair.rejected if rng.random() < banned_fraction else pair.chosen
        prompt_ids = prompt.encode(tokenizer, tokenizer.bos_token + pair.query)
        answer_ids = tokenizer(response + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        rows.append(prompt_ids + answer_ids)
        masks.append([0.0] * len(prompt_ids) + [1.0] * len(answer_ids))
    tokens = np.full((batch_size, max(map(len, rows))), tokenizer.pad_token_id, np.int32)
    loss_mask = np.zeros(tokens.shape, np.float32)
    for b, (row, mask) in enumerate(zip(rows, masks)):
        tokens[b, : len(row)] = row
        loss_mask[b, : len(mask)] = mask
    return {"tokens": tokens, "loss_mask": loss_mask}
