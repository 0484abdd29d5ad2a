"""A character-level Hugging Face tokenizer for tiny judges (the embedded toy task, tests).

It is a real `transformers.PreTrainedTokenizerFast`: it saves with `save_pretrained` next to a
checkpoint and reloads with `AutoTokenizer.from_pretrained`, so every rrm-jax command treats a toy
checkpoint like any other. Every printable ASCII character and the newline is one token (anything
else becomes <unk>); the strings the RRM format is built from are single tokens, so a whole verdict
`</think>\\boxed{Assistant 1}` is four tokens and its decision is one. Those marker tokens are not
"special", as in the DeepSeek-R1-Distill tokenizer, so decoding with skip_special_tokens=True keeps
them and the RRM parser can read the text.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from rrm_jax.rrm import spec

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
VERDICT_TOKENS = ("Assistant 1", "Assistant 2")
BOXED_OPEN = "\\boxed{"
MARKER_TOKENS = (spec.THINK_OPEN, spec.THINK_CLOSE, BOXED_OPEN, *VERDICT_TOKENS)
CHARACTERS = tuple(chr(c) for c in range(32, 127)) + ("\n",)


def build_char_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """The character tokenizer: ids 0-3 special tokens, then the characters, then the marker tokens."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    # BPE without merges is a pure character model: each character is looked up on its own.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.decoder = decoders.Fuse()  # join the pieces as they are (no spaces in between)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKER_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def verdict_token_ids(tokenizer) -> tuple[int, int]:
    """Ids of the single tokens "Assistant 1" and "Assistant 2" (the toy's verdict positions)."""
    ids = tuple(tokenizer.convert_tokens_to_ids(t) for t in VERDICT_TOKENS)
    if tokenizer.unk_token_id in ids or None in ids:
        raise ValueError("this tokenizer has no single verdict tokens 'Assistant 1' / 'Assistant 2'")
    return ids
