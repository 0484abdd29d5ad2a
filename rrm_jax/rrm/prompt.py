"""The RRM judging prompt and the verdict parser, byte-compatible with the released RRM-7B / RRM-32B.

The prompt is a [system, user] conversation rendered through the tokenizer's chat template with the
generation prompt; with the DeepSeek-R1-Distill template it ends with `<｜Assistant｜><think>\\n`, so the
model's output starts inside its thinking block. The rendered text already holds the BOS token, so it is
tokenized with `add_special_tokens=False` (`encode`); tokenizing it the default way would add a second BOS.

The query and the responses are tokenized as plain text (`PromptEncoder`): a `<｜User｜>`, `</think>` or
end-of-sentence marker written inside them must not become the control token itself, or a policy judged
by an RRM could learn to forge a judge turn and a verdict. The template's own markers stay control tokens.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Sequence

from rrm_jax.errors import UserError
from rrm_jax.rrm import spec

# Chat templates a user may name explicitly for a tokenizer that ships without one (CLI: --chat-template).
CHAT_TEMPLATES = {"deepseek-r1-distill": spec.DEEPSEEK_R1_DISTILL_CHAT_TEMPLATE}


def messages(question: str, answer1: str, answer2: str) -> list[dict[str, str]]:
    """The [system, user] conversation the RRM sees for one comparison (answer1 shown as Assistant 1)."""
    user = spec.USER_TEMPLATE.format(question=question, answer1=answer1, answer2=answer2) + spec.USER_SUFFIX
    return [{"role": "system", "content": spec.SYSTEM_PROMPT}, {"role": "user", "content": user}]


def chat_template_named(name: str) -> str:
    """The Jinja chat template registered under `name` in CHAT_TEMPLATES."""
    if name not in CHAT_TEMPLATES:
        raise UserError(f"unknown chat template {name!r}; known: {', '.join(sorted(CHAT_TEMPLATES))}")
    return CHAT_TEMPLATES[name]


def render(tokenizer, question: str, answer1: str, answer2: str, *, chat_template: str | None = None) -> str:
    """The prompt text for one comparison, through the tokenizer's chat template with the generation prompt.

    `chat_template` (a Jinja string, e.g. `chat_template_named("deepseek-r1-distill")`) replaces the
    tokenizer's own; a tokenizer without a chat template and no `chat_template` is a UserError, because
    guessing a layout would silently feed the model a prompt it was never trained on.
    """
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise UserError(
            "the tokenizer has no chat template; RRM prompts need one: pass chat_template="
            "chat_template_named('deepseek-r1-distill') (CLI: --chat-template deepseek-r1-distill)"
        )
    return tokenizer.apply_chat_template(
        messages(question, answer1, answer2), chat_template=template, tokenize=False, add_generation_prompt=True
    )


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of an already rendered prompt, without adding special tokens a second time."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def render_ids(tokenizer, question: str, answer1: str, answer2: str, *, chat_template: str | None = None) -> list[int]:
    """The prompt token ids the sampler gets: those of `render(...)`, the question and answers tokenized as
    plain text (`PromptEncoder`; for many prompts make one encoder and call it)."""
    return PromptEncoder(tokenizer, chat_template=chat_template)(question, answer1, answer2)


def _last_boxed(text: str) -> str | None:
    """The last `\\boxed...` in text, from its backslash through the brace that closes its first `{`."""
    start = text.rfind("\\boxed")
    depth = 0
    for pos in range(start, len(text)):
        if text[pos] == "{":
            depth += 1
        elif text[pos] == "}":
            depth -= 1
            if depth == 0:
                return text[start : pos + 1]
    return None


def parse_verdict(generated_text: str) -> int | None:
    """1 or 2 for the response the judge picked, None when the output is unparseable.

    The rule of the authors' evaluation code: the generation starts inside `<think>`, so the verdict is
    looked for only between the first and the second `</think>`; there the last `\\boxed{...}`
    (brace-matched) must hold exactly `Assistant 1` or `Assistant 2`. No `</think>`, no `\\boxed`, an
    unclosed brace, `\\boxed {...}`, extra spaces, `\\text{...}` or `\\fbox{...}` alone: None.
    """
    answer = spec.THINK_OPEN + generated_text
    if spec.THINK_CLOSE not in answer:
        return None
    segment = answer.split(spec.THINK_CLOSE)[1]
    if "\\boxed" not in segment:
        return None
    boxed = _last_boxed(segment)
    if boxed is None or not boxed.startswith("\\boxed{"):  # e.g. `\boxed {...}`
        return None
    return {"Assistant 1": 1, "Assistant 2": 2}.get(boxed[len("\\boxed{") : -1])


# ---------------------------------------------------------------------------------------------------
# Token ids with the query and responses as plain text


def is_marker(token) -> bool:
    """Whether an added token (a `tokenizers.AddedToken`) is a control marker: every special token, and
    every other added token that is not made of plain words (letters, digits, spaces) -- `<｜User｜>`,
    `<think>`, `\\boxed{`. Word tokens such as the toy tokenizer's `avoid ` or `Assistant 1` are
    vocabulary shortcuts: text that holds them means the same whichever way it is tokenized."""
    return token.special or not all(ch.isalnum() or ch.isspace() for ch in token.content)


class PromptEncoder:
    """Token ids of judging prompts, with the query and responses tokenized as plain text.

    The template is rendered once with placeholders (`render`, or the `render_fn` given, e.g. the toy's
    fast equivalent). That skeleton is tokenized: the markers it holds are the template's own and stay
    control tokens; the text between two of them is a stretch, some of which hold placeholders. A
    prompt's stretches with the query and responses filled in are tokenized by the tokenizer as usual
    -- a tokenizer cuts its input at markers and tokenizes each piece on its own, so for ordinary text
    these are exactly the ids of the whole prompt -- and only a stretch in which it matched a marker
    (which the template did not put there) is tokenized again by a copy of the tokenizer that knows no
    markers. `neutralised` counts those markers over every prompt encoded.

    A template that rewrites the messages (the placeholders do not come back intact), or a tokenizer
    without a `tokenizers` backend, cannot be cut this way: the prompt is then tokenized whole, as
    before, and a warning says that markers in the text are not neutralised.
    """

    SLOTS = ("\x00question\x00", "\x00answer1\x00", "\x00answer2\x00")
    PROBE = (" Which one? ", "first answer\n", "\n second  answer ")  # blanks at the edges: any merge across shows

    def __init__(
        self,
        tokenizer,
        *,
        chat_template: str | None = None,
        render_fn: Callable[[object, str, str, str], str] | None = None,
    ):
        self.tokenizer = tokenizer
        self.render_fn = render_fn or (lambda tok, q, a1, a2: render(tok, q, a1, a2, chat_template=chat_template))
        self.neutralised = 0
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        self.layout: list | None = None
        if self.backend is None:
            return self._unprotected("the tokenizer has no `tokenizers` backend")
        self.markers = {i for i, t in tokenizer.added_tokens_decoder.items() if is_marker(t)} - {tokenizer.unk_token_id}
        self._plain = None
        skeleton = self.render_fn(tokenizer, *self.SLOTS)
        positions = [skeleton.find(slot) for slot in self.SLOTS]
        if not all(skeleton.count(slot) == 1 for slot in self.SLOTS) or positions != sorted(positions):
            return self._unprotected("the chat template changes the text of the messages")
        self.layout = self._cut(skeleton)
        probe = self.render_fn(tokenizer, *self.PROBE)
        if self._fill(skeleton, self.PROBE) != probe or self.encode_batch([self.PROBE]) != [encode(tokenizer, probe)]:
            self.layout = None
            return self._unprotected("the chat template changes the text of the messages")
        self.neutralised = 0

    def _unprotected(self, why: str) -> None:
        print(
            f"warning: {why}: judge prompts are tokenized whole, and control markers written in a query or "
            f"response become control tokens",
            file=sys.stderr,
        )

    def _fill(self, skeleton: str, texts: Sequence[str]) -> str:
        for slot, text in zip(self.SLOTS, texts):
            skeleton = skeleton.replace(slot, text)
        return skeleton

    def _cut(self, skeleton: str) -> list:
        """The skeleton as a list of marker ids (int) and stretches (lists of template text and slot
        numbers); a stretch without slots is stored as its token ids (a tuple)."""
        encoding = self.backend.encode(skeleton, add_special_tokens=False)
        layout, start = [], 0
        for token_id, (begin, end) in zip(encoding.ids, encoding.offsets):
            if token_id in self.markers:
                layout += [self._stretch(skeleton[start:begin]), token_id]
                start = end
        layout.append(self._stretch(skeleton[start:]))
        return [item for item in layout if item != ()]

    def _stretch(self, text: str):
        parts = [
            self.SLOTS.index(p) if p in self.SLOTS else p
            for p in re.split("(" + "|".join(map(re.escape, self.SLOTS)) + ")", text)
            if p
        ]
        if all(isinstance(p, str) for p in parts):
            return tuple(self.backend.encode(text, add_special_tokens=False).ids) if text else ()
        return parts

    def _encode_plain(self, text: str) -> list[int]:
        """`text` tokenized by a copy of the tokenizer without its markers: they are plain text to it."""
        if self._plain is None:
            from tokenizers import Tokenizer

            spec_json = json.loads(self.backend.to_str())
            kept = [t for t in spec_json["added_tokens"] if t["id"] not in self.markers]
            spec_json["added_tokens"] = kept
            plain = Tokenizer.from_str(json.dumps(spec_json))
            # the copy numbers its remaining added tokens anew, after its vocabulary: give them their ids back
            self._plain = plain, {plain.token_to_id(t["content"]): t["id"] for t in kept}
        plain, ids_back = self._plain
        return [ids_back.get(i, i) for i in plain.encode(text, add_special_tokens=False).ids]

    def __call__(self, question: str, answer1: str, answer2: str) -> list[int]:
        return self.encode_batch([(question, answer1, answer2)])[0]

    def encode_batch(self, comparisons: Sequence[tuple[str, str, str]]) -> list[list[int]]:
        """The prompt ids of each (question, answer1, answer2)."""
        if self.layout is None:
            texts = [self.render_fn(self.tokenizer, *c) for c in comparisons]
            return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
        stretches = [item for item in self.layout if isinstance(item, list)]
        texts = [
            "".join(c[p] if isinstance(p, int) else p for p in stretch) for c in comparisons for stretch in stretches
        ]
        encode_fast = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)  # no offsets needed
        filled = []
        for text, encoding in zip(texts, encode_fast(texts, add_special_tokens=False) if texts else []):
            ids = encoding.ids
            if not self.markers.isdisjoint(ids):
                self.neutralised += sum(i in self.markers for i in ids)
                ids = self._encode_plain(text)
            filled.append(ids)
        out, k = [], 0
        for _ in comparisons:
            ids = []
            for item in self.layout:
                if isinstance(item, int):
                    ids.append(item)
                elif isinstance(item, tuple):
                    ids += item
                else:
                    ids += filled[k]
                    k += 1
            out.append(ids)
        return out
