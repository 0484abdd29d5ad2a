"""What JAX users habitually pass: dtypes as names or objects, mesh sizes of -1, and a --help that answers at once."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_utils import make_hf_model

import rrm_jax
from rrm_jax import checkpoint, cli, options, parallel
from rrm_jax.errors import UserError
from rrm_jax.model.config import PRESETS
from rrm_jax.rl import trainer
from rrm_jax.rl.config import load_config

ROOT = Path(__file__).resolve().parents[1]
FLOAT32 = ["float32", jnp.float32, np.dtype("float32"), np.float32, "fp32", "jnp.float32"]
BFLOAT16 = ["bfloat16", jnp.bfloat16, np.dtype(jnp.bfloat16), "bf16"]


def _params(model) -> dict:
    return {k: np.asarray(v) for k, v in checkpoint.flatten(model.params()).items()}


def test_load_model_gives_the_same_parameters_for_every_dtype_spelling(tmp_path):
    folder, _ = make_hf_model(tmp_path)
    for spellings, name in ((FLOAT32, "float32"), (BFLOAT16, "bfloat16")):
        loaded = [rrm_jax.load_model(folder, dtype=s) for s in spellings]
        reference = _params(loaded[0][0])
        for (model, config), spelling in zip(loaded, spellings):
            assert (config.param_dtype, config.dtype) == (name, name), spelling
            got = _params(model)
            for path, value in reference.items():
                assert got[path].dtype == value.dtype == jnp.dtype(name)
                np.testing.assert_array_equal(got[path], value, err_msg=f"{path} with dtype={spelling!r}")
    _, config = rrm_jax.load_model(folder, dtype=np.dtype("float32"), compute_dtype=jnp.bfloat16)
    assert (config.param_dtype, config.dtype) == ("float32", "bfloat16")
    with pytest.raises(
        UserError, match=r"dtype=<class 'jax.numpy.int32'> is not supported; use one of float32, bfloat16"
    ):
        rrm_jax.load_model(folder, dtype=jnp.int32)


def test_qwen2_config_and_dtype_flags_take_every_spelling():
    for spelling, name in [(s, "float32") for s in FLOAT32] + [(s, "bfloat16") for s in BFLOAT16]:
        config = PRESETS["tiny"].replace(param_dtype=spelling, dtype=spelling)
        assert config.param_dtype == config.dtype == name
        hash(config)  # still a valid jit static argument
        assert json.dumps(config.to_dict())
    for argv in (
        ["bench", "sample", "--preset", "tiny", "--dtype", "bf16"],
        ["bench", "train", "--preset", "tiny", "--dtype", "jnp.bfloat16"],
        ["convert", "hf-to-orbax", "--hf", "a", "--out", "b", "--dtype", "bf16"],
    ):
        assert cli.build_parser(argv).parse_args(argv).dtype == "bfloat16"


def test_mesh_minus_one_fills_the_devices():
    assert jax.device_count() == 8  # tests/conftest.py
    assert parallel.make_mesh(fsdp=-1).devices.shape == (1, 8, 1)
    assert parallel.make_mesh(-1, 1, 2).devices.shape == (4, 1, 2)
    for overrides in (["mesh.fsdp=-1"], []):  # the default mesh of `rrm-jax train` is fsdp=-1
        assert trainer.make_mesh(load_config(None, overrides)).devices.shape == (1, 8, 1)
    assert trainer.make_mesh(load_config(None, ["mesh.data=-1", "mesh.fsdp=1"])).devices.shape == (8, 1, 1)
    with pytest.raises(UserError, match="at most one -1"):
        load_config(None, ["mesh.data=-1"])
    with pytest.raises(UserError, match=r"the other sizes \(3\) do not divide the 8 devices"):
        parallel.make_mesh(3, -1, 1)
    # judge / eval / rank / generate: --mesh over this process's own devices
    argv = ["judge", "--model", "M", "--query", "q", "--response-1", "a", "--response-2", "b", "--mesh", "-1,1,2"]
    shape = cli.build_parser(argv).parse_args(argv).mesh
    assert shape == (-1, 1, 2) and options.local_mesh(shape).devices.shape == (4, 1, 2)
    assert options.local_mesh(None) is None


def test_a_bad_override_names_the_command_line(capsys):
    assert cli.main(["train", "max_steps=abc"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "rrm-jax: error: config key max_steps='abc' in the command line must be of type int"


HELP = """
import contextlib, io, sys
from rrm_jax import cli
texts = {}
for command in cli.COMMANDS:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            cli.main([command, "--help"])
        except SystemExit:
            pass
    texts[command] = out.getvalue()
heavy = sorted(m for m in ("jax", "flax", "orbax", "transformers", "torch", "datasets") if m in sys.modules)
print(heavy, "8192" in texts["judge"] and "default: 256" in texts["generate"] and "runs/toy" in texts["train"])
"""


def test_help_of_every_command_imports_nothing_heavy_and_shows_defaults():
    done = subprocess.run([sys.executable, "-c", HELP], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "True"]
