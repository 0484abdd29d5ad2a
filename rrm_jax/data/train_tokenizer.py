"""The tokenizer a training config names: the toy's built-in character tokenizer or a saved one.

Its own module so that `rrm-jax plan` (which needs the vocabulary size) and the trainer both read it
without importing each other."""

from __future__ import annotations

from pathlib import Path

from rrm_jax import checkpoint
from rrm_jax.data import toy
from rrm_jax.errors import UserError

TOY_TOKENIZER = "toy-char"


def load_train_tokenizer(name: str):
    if name == TOY_TOKENIZER:
        return toy.toy_tokenizer()
    tokenizer = checkpoint.load_tokenizer(name) if Path(name).exists() else None
    if tokenizer is None:
        raise UserError(f"tokenizer={name!r}: use {TOY_TOKENIZER} or a model / tokenizer folder that holds one")
    return tokenizer
