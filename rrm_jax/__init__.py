"""rrm-jax: JAX toolkit for Reward Reasoning Models.

Top-level names are imported lazily so `import rrm_jax` (and `rrm-jax --help`) stays fast."""

import importlib
import logging


class _NoTorchNotice(logging.Filter):
    """Drops transformers' "PyTorch was not found. Models won't be available..." notice: rrm-jax uses
    transformers only for tokenizers and configs, so without torch (the default install) nothing is missing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("PyTorch was not found")


# transformers logs it on its package logger when first imported; the logger exists before that import
logging.getLogger("transformers").addFilter(_NoTorchNotice())

_LAZY = {
    "sample": "rrm_jax.generate",
    "load_model": "rrm_jax.checkpoint",
    "save_hf": "rrm_jax.checkpoint",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rrm_jax' has no attribute {name!r}")
