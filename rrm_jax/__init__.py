"""rrm-jax: JAX toolkit for Reward Reasoning Models.

Top-level names are imported lazily so `import rrm_jax` (and `rrm-jax --help`) stays fast."""

import importlib

_LAZY = {
    "sample": "rrm_jax.generate",
    "load_model": "rrm_jax.checkpoint",
    "save_hf": "rrm_jax.checkpoint",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rrm_jax' has no attribute {name!r}")
