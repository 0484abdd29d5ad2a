"""The tokenizer of a training config: the built-in character tokenizer of the toy task, or a folder's.

Its own module because both the trainer and the memory planner (the vocabulary size) need it."""

from __future__ import annotations

from pathlib import Path

from rrm_jax.errors import UserError

TOY_TOKENIZER = "toy-char"


def load_train_tokenizer(name: str):
    if name == TOY_TOKENIZER:
        from rrm_jax.data import toy

        return toy.toy_tokenizer()
    from rrm_jax import checkpoint

    tokenizer = checkpoint.load_tokenizer(name) if Path(name).exists() else None
    if tokenizer is None:
        raise UserError(f"tokenizer={name!r}: use {TOY_TOKENIZER} or a model / tokenizer folder that holds one")
    return tokenizer


def token_ids_of(tokenizer, tokens: str, key: str) -> tuple[int, ...]:
    """The ids of `tokens`, space-separated token strings of the tokenizer's vocabulary (config key `key`);
    a string that is not one token is refused naming it."""
    ids = []
    for token in tokens.split():
        i = tokenizer.convert_tokens_to_ids(token)
        if i is None or (i == tokenizer.unk_token_id and token != tokenizer.unk_token):
            raise UserError(
                f"{key}: {token!r} is not a token of this tokenizer; give space-separated token "
                f"strings of its vocabulary (e.g. {key}='a b c')"
            )
        ids.append(int(i))
    return tuple(sorted(set(ids)))
