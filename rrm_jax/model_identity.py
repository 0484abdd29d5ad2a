"""Which model a `--model` path loads, recorded in partial files so that a resume cannot mix two models.

A training run folder loads its newest checkpoint step, so the same `--model RUN` can load another
model after training went on. The identity of a load is the folder actually read (the step folder of
a run, an rrm-jax checkpoint, an HF folder) and a SHA-256 of what describes its contents: for an
rrm-jax checkpoint its model config and Orbax's step metadata (which holds the commit time, so a step
written again differs), for an HF folder its config.json and the names and sizes of its weight files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def identify(model: str) -> dict:
    """{"path": the folder a load of `model` reads, "config_sha256": digest of its description}; a path
    that does not exist is kept as given, with no digest (loading it fails on its own)."""
    from rrm_jax import checkpoint
    from rrm_jax.model import hf

    path = Path(model)
    if not path.exists():
        return {"path": model, "config_sha256": None}
    digest = hashlib.sha256()
    if hf.is_hf_folder(path):
        folder = path.absolute()
        digest.update((folder / "config.json").read_bytes())
        weights = sorted((p.name, p.stat().st_size) for p in folder.glob("*.safetensors"))
        digest.update(json.dumps(weights).encode("utf-8"))
    else:
        folder = checkpoint.resolve_checkpoint(path)
        digest.update(json.dumps(checkpoint.read_checkpoint_config(folder).to_dict(), sort_keys=True).encode("utf-8"))
        step_metadata = folder / "_CHECKPOINT_METADATA"
        if step_metadata.is_file():
            digest.update(step_metadata.read_bytes())
    return {"path": str(folder), "config_sha256": digest.hexdigest()}


def describe(identity: dict) -> str:
    sha = identity.get("config_sha256")
    return f"{identity.get('path')} (config sha256 {sha[:12] if sha else 'unknown'})"
