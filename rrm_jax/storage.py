"""Where runs and exports are written: a local folder, or a Google Cloud Storage bucket (`gs://...`).

A bucket cannot rename a folder (a "rename" would be a copy of every object, and gcsfuse refuses it
on an ordinary bucket), but every object it stores appears whole once its upload finishes. So on a
bucket path nothing rrm-jax writes depends on renaming a folder:
  - Orbax commits a checkpoint with a `commit_success.txt` file instead of its rename
    (`checkpoint.atomicity_options`), and only committed steps are read back;
  - a checkpoint's tokenizer is saved locally and copied in file by file;
  - a converted or exported folder is written in place, `config.json` last (a folder cut short is
    never taken for a model folder) and removed again on an error;
  - a single file (config.yaml, metrics.jsonl, heldout.jsonl, the curve) is one upload.
Local folders keep the write-beside-and-rename: a folder or file appears only when complete.

Bucket paths go through etils.epath (Orbax's own path library); it reads and writes `gs://` with
gcsfs (the `gcs` extra of setup.py).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from etils import epath

from rrm_jax.errors import UserError

BUCKET_PREFIXES = ("gs://",)


def is_bucket(path) -> bool:
    return str(path).startswith(BUCKET_PREFIXES)


def as_path(path) -> Path:
    """`path` as a path object that keeps its meaning: epath for a bucket (pathlib would turn
    `gs://b/x` into `gs:/b/x`), pathlib otherwise."""
    return epath.Path(str(path)) if is_bucket(path) else Path(path)


def check_support(path) -> None:
    """A bucket path needs gcsfs (etils.epath's way to gs://): without it, one line saying how to get it."""
    if is_bucket(path) and importlib.util.find_spec("gcsfs") is None:
        raise UserError(
            f"{path} is on Google Cloud Storage, which needs gcsfs: pip install -e '.[gcs]' "
            f"(the gcs extra; launch/tpu_run.sh setup installs it)"
        )


def renames_folders(path) -> bool:
    """Whether outputs under `path` may be finished by renaming a folder (not on a bucket). The one
    switch every writer asks, so the tests can force the bucket behaviour onto a local folder."""
    return not is_bucket(path)


def can_append(path) -> bool:
    """Whether a file under `path` can be appended to in place (a bucket's objects are immutable)."""
    return not is_bucket(path)


def write_bytes(path, data: bytes) -> None:
    """Write a whole file, never half of it: locally to a temporary file beside it, fsynced, then
    renamed over it; on a bucket one upload (the object appears only once it is complete)."""
    path = as_path(path)
    if is_bucket(path):
        path.write_bytes(data)
        return
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def copy_file(src, dst) -> None:
    """Copy one file, creating the folder of `dst`; either side may be a bucket path."""
    src, dst = as_path(src), as_path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if is_bucket(src) or is_bucket(dst):
        dst.write_bytes(src.read_bytes())
    else:
        shutil.copy2(src, dst)


def remove_tree(path) -> None:
    path = as_path(path)
    if is_bucket(path):
        if path.exists():
            path.rmtree()
    else:
        shutil.rmtree(path, ignore_errors=True)
