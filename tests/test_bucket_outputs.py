"""Runs and exports on a bucket (gs://): nothing depends on renaming a folder.

No bucket is reachable here, so the bucket behaviour is forced onto a local folder: every writer asks
`storage.renames_folders(path)`, which the tests make answer False, while renaming a folder is made
to fail. What only a real bucket exercises (gcsfs, TensorStore's gcs driver, tensorboardX's upload)
is not run here; the README says so."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from test_trainer import TINY

from rrm_jax import checkpoint, cli, storage
from rrm_jax.model.config import Qwen2Config
from rrm_jax.model.convert import checkpoint_to_hf, configure, hf_to_checkpoint
from rrm_jax.model.qwen2 import Qwen2
from rrm_jax.rl import trainer
from rrm_jax.rl.config import load_config


class FolderRenamed(OSError):
    pass


@pytest.fixture
def no_folder_renames(monkeypatch):
    """Renaming a folder fails (as on gcsfuse over a flat bucket); files may still be renamed (a
    local file's atomic write, TensorStore's own files)."""
    for name in ("rename", "replace"):
        real = getattr(os, name)

        def guarded(src, dst, *args, _real=real, **kwargs):
            if os.path.isdir(src):
                raise FolderRenamed(f"renamed folder {src} -> {dst}")
            return _real(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, name, guarded)


@pytest.fixture
def bucket_mode(monkeypatch, no_folder_renames):
    monkeypatch.setattr(storage, "renames_folders", lambda path: False)


def _params(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(model.params())]


def test_bucket_paths_keep_their_scheme():
    run = storage.as_path("gs://my-bucket/runs/rrm-7b")
    assert str(run / trainer.CHECKPOINTS / "12") == "gs://my-bucket/runs/rrm-7b/checkpoints/12"
    assert str(checkpoint.orbax_path("gs://my-bucket/runs/x")) == "gs://my-bucket/runs/x"
    assert storage.renames_folders("runs/x") and not storage.renames_folders("gs://my-bucket/x")
    assert checkpoint.atomicity_options("runs/x") is None  # Orbax's own default: rename locally
    assert checkpoint.atomicity_options("gs://my-bucket/x").mode == ocp.options.AtomicityMode.COMMIT_FILE
    import argparse

    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args(["orbax-to-hf", "--ckpt", "gs://my-bucket/runs/x", "--out", "gs://my-bucket/x-hf"])
    assert (str(args.ckpt), str(args.out)) == ("gs://my-bucket/runs/x", "gs://my-bucket/x-hf")


def test_the_guard_catches_a_local_checkpoint_rename(tmp_path, no_folder_renames):
    """Without the bucket behaviour a checkpoint is a folder rename (Orbax's commit), so the tests
    below would fail if any writer still renamed one."""
    config = Qwen2Config(
        vocab_size=16,
        hidden_size=8,
        intermediate_size=16,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        max_position_embeddings=16,
    )
    with pytest.raises(FolderRenamed):
        checkpoint.save_checkpoint(Qwen2(config, rngs=nnx.Rngs(0)), config, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_a_run_and_its_exports_rename_no_folder(tmp_path, bucket_mode):
    out, export = tmp_path / "run", tmp_path / "run-hf"
    config = load_config(None, TINY + ["max_steps=0", "warmup.steps=0", "eval_every=0"])
    assert trainer.train(config, out, export_hf=str(export), progress=False) == 0
    step = out / trainer.CHECKPOINTS / "0"
    assert (step / checkpoint.COMMIT_FILE).is_file()  # committed by Orbax's commit file, in place
    assert checkpoint.load_tokenizer(out) is not None  # the assets copied in file by file
    assert (out / "curve.png").read_bytes().startswith(b"\x89PNG")
    model, _ = checkpoint.load_model(out)
    exported, _ = checkpoint.load_model(export)
    for x, y in zip(_params(model), _params(exported)):
        np.testing.assert_array_equal(x, y)

    # both directions of `rrm-jax convert`
    ckpt = hf_to_checkpoint(export, tmp_path / "ckpt")
    assert (ckpt / checkpoint.COMMIT_FILE).is_file() and checkpoint.load_tokenizer(ckpt) is not None
    again = checkpoint_to_hf(ckpt, tmp_path / "again-hf")
    for x, y in zip(_params(model), _params(checkpoint.load_model(again)[0])):
        np.testing.assert_array_equal(x, y)

    # a step Orbax has not committed yet (no commit file) is not taken for a checkpoint
    (step / checkpoint.COMMIT_FILE).unlink()
    assert checkpoint.latest_step(out / trainer.CHECKPOINTS) is None


def test_an_export_cut_short_is_removed_and_never_looks_complete(tmp_path, bucket_mode, monkeypatch):
    out = tmp_path / "run"
    config = load_config(None, TINY + ["max_steps=0", "warmup.steps=0", "eval_every=0"])
    assert trainer.train(config, out, progress=False) == 0
    from rrm_jax.model import hf

    seen = []
    write_json = hf.write_json

    def fail_on_config(path: Path, value):  # the folder as a reader would find it just before config.json
        seen.append(sorted(p.name for p in path.parent.iterdir()))
        if path.name == "config.json":
            raise KeyboardInterrupt
        write_json(path, value)

    monkeypatch.setattr(hf, "write_json", fail_on_config)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_to_hf(out, tmp_path / "hf")
    assert "config.json" not in seen[-1] and "model.safetensors" in seen[-1]  # config.json is the last file
    assert not (tmp_path / "hf").exists()


@pytest.mark.skipif(
    importlib.util.find_spec("gcsfs") is not None, reason="gcsfs installed: the bucket would be reached"
)
@pytest.mark.parametrize(
    "argv",
    [
        ["convert", "orbax-to-hf", "--ckpt", "gs://my-bucket/run", "--out", "{tmp}/hf"],
        ["train", "--output-dir", "gs://my-bucket/run", "--no-progress"],
    ],
)
def test_a_bucket_path_without_gcsfs_is_one_line(tmp_path, capsys, argv):
    assert cli.main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "rrm-jax: error: gs://my-bucket/run is on Google Cloud Storage, which needs gcsfs: "
        "pip install -e '.[gcs]' (the gcs extra; launch/tpu_run.sh setup installs it)"
    )
    assert not any(tmp_path.iterdir())
