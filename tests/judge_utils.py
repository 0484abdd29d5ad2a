"""Helpers for tests of judging: a small DeepSeek-R1-Distill-style tokenizer and a scripted judge.

`build_test_tokenizer(folder)` makes a byte-level BPE tokenizer (no merges: one token per byte) carrying the
DeepSeek-R1-Distill special tokens and chat template, saved with `save_pretrained` so it loads back with
`AutoTokenizer.from_pretrained(folder)`. Like the real one, it adds a BOS when asked to add special
tokens, and `<｜User｜>`, `<｜Assistant｜>`, `<think>`, `</think>` are added tokens that are not "special"
(they survive `skip_special_tokens=True`). Its vocabulary is 262 tokens, small enough for a tiny model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PLAIN_ADDED = ("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>")


def build_test_tokenizer(folder: str | Path, *, chat_template: str | None = "deepseek-r1-distill"):
    """Save a test tokenizer in `folder` and return it loaded back through AutoTokenizer.

    chat_template: "deepseek-r1-distill" (the released models' template) or None (no template).
    """
    from rrm_jax.rrm.spec import DEEPSEEK_R1_DISTILL_CHAT_TEMPLATE

    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(byte_chars)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (EOS, BOS)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in PLAIN_ADDED])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS)
    if chat_template == "deepseek-r1-distill":
        wrapped.chat_template = DEEPSEEK_R1_DISTILL_CHAT_TEMPLATE
    elif chat_template is not None:
        raise ValueError(chat_template)
    wrapped.save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def shown_pair(prompt_text: str) -> tuple[str, str, str]:
    """(query, Assistant 1 text, Assistant 2 text) read back out of a rendered RRM prompt."""
    user = prompt_text.split("<｜User｜>", 1)[1]
    query = user.split("## Query\n\n", 1)[1].split("\n\n## Assistant responses\n\n", 1)[0]
    first = user.split("### Assistant 1\n\n", 1)[1].split("\n\n\n### Assistant 2\n\n", 1)[0]
    second = user.split("\n\n\n### Assistant 2\n\n", 1)[1].rsplit("\n\n## Analysis\n\n", 1)[0]
    return query, first, second


def boxed(assistant: int, reasoning: str = "Let me compare them.") -> str:
    """A well-formed judge output picking Assistant `assistant` (1 or 2)."""
    return f"{reasoning}\n</think>\n\n\\boxed{{Assistant {assistant}}}"


@dataclass
class Output:
    text: str


class ScriptedGenerate:
    """A stand-in for `functools.partial(rrm_jax.sample, model, tokenizer=tok)`.

    `script(query, first, second, sample_index) -> text` decides each output from what the prompt shows.
    Every call's keyword arguments and decoded prompts are recorded for assertions.
    """

    def __init__(self, tokenizer, script: Callable[[str, str, str, int], str]):
        self.tokenizer, self.script = tokenizer, script
        self.calls: list[dict] = []

    def __call__(self, prompt_ids, **kwargs):
        prompts = [self.tokenizer.decode(ids) for ids in prompt_ids]
        self.calls.append({"prompt_ids": [list(p) for p in prompt_ids], "prompts": prompts, **kwargs})
        if kwargs.get("progress"):
            kwargs["progress"](len(prompt_ids))
        return [Output(self.script(*shown_pair(p), s)) for p in prompts for s in range(kwargs["num_samples"])]


class SeededGenerate(ScriptedGenerate):
    """A stand-in that, like `rrm_jax.sample`, draws each output from its own random stream: the verdict
    and text of sample s of the prompt at position p of a call come from SHA-256 of (seed, p, s, prompt
    ids), and about one sample in six is unparseable. So outputs change whenever the seed or the place of
    a prompt in its sampler call changes, which is what the batch-plan and resume tests need to see.

    on_call(call_number): called before each call returns (e.g. to send the process a signal)."""

    def __init__(self, tokenizer, on_call: Callable[[int], None] | None = None):
        super().__init__(tokenizer, script=None)
        self.on_call = on_call

    def __call__(self, prompt_ids, **kwargs):
        self.calls.append({"prompt_ids": [list(p) for p in prompt_ids], **kwargs})
        outputs = []
        for position, ids in enumerate(prompt_ids):
            for s in range(kwargs["num_samples"]):
                digest = hashlib.sha256(json.dumps([kwargs["seed"], position, s, list(ids)]).encode()).digest()
                text = boxed(1 + digest[0] % 2, reasoning=f"stream {digest.hex()[:12]}")
                outputs.append(Output("no verdict" if digest[1] % 6 == 0 else text))
        if self.on_call is not None:
            self.on_call(len(self.calls))
        return outputs

    @property
    def prompts_sampled(self) -> list[list[int]]:
        return [p for call in self.calls for p in call["prompt_ids"]]
