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
