"""The RRM judging prompt and the verdict parser, byte-compatible with the released RRM-7B / RRM-32B.

The prompt is a [system, user] conversation rendered through the tokenizer's chat template with the
generation prompt; with the DeepSeek-R1-Distill template it ends with `<｜Assistant｜><think>\\n`, so the
model's output starts inside its thinking block. The rendered text already holds the BOS token, so it is
tokenized with `add_special_tokens=False` (`encode`); tokenizing it the default way would add a second BOS.
"""

from __future__ import annotations

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
    """`encode(tokenizer, render(...))`: the prompt token ids the sampler gets."""
    return encode(tokenizer, render(tokenizer, question, answer1, answer2, chat_template=chat_template))


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
