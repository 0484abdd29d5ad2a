"""The CLI's persistent compilation cache: a second run of the same command compiles nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rrm_jax import cli, compile_cache

ROOT = Path(__file__).resolve().parents[1]
# the engine on a handful of ragged requests: the path judge / eval / generate take
BENCH = [
    "bench",
    "sample",
    "--workload",
    "rrm",
    "--preset",
    "tiny",
    "--requests",
    "4",
    "--slots",
    "2",
    "--prompt-range",
    "8",
    "24",
    "--max-new-tokens",
    "8",
    "--no-static",
]


def _run(args, **env):
    full_env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        compile_cache.REPORT_ENV: "1",
        **env,
    }
    done = subprocess.run(
        [sys.executable, "-m", "rrm_jax.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    lines = [l for l in done.stderr.splitlines() if l.startswith(compile_cache.REPORT_PREFIX)]
    assert len(lines) == 1, done.stderr
    return json.loads(lines[0][len(compile_cache.REPORT_PREFIX) :])


def test_second_run_of_a_command_reads_every_program_from_the_cache(tmp_path):
    cache = tmp_path / "cache"
    cold = _run(BENCH, RRM_JAX_COMPILE_CACHE=str(cache))  # the environment variable ...
    warm = _run([*BENCH, "--compile-cache", str(cache)], RRM_JAX_COMPILE_CACHE="off")  # ... and the flag, which wins
    assert cold["cache_dir"] == warm["cache_dir"] == str(cache)
    assert cold["cache_hits"] == 0 and cold["cache_misses"] >= 3  # prefill, decode, sampling helpers ...
    assert (
        warm["cache_misses"] == 0 and warm["cache_hits"] == cold["cache_misses"]
    )  # every program, even sub-second ones
    assert warm["backend_compile_s"] < cold["backend_compile_s"] / 4, (cold, warm)
    assert any(cache.iterdir())


def test_cache_folder_resolution(monkeypatch, tmp_path):
    for var in (compile_cache.ENV, "JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert compile_cache.resolve(None) == tmp_path / ".cache" / "rrm-jax" / "jax-compile"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.resolve(None) == tmp_path / "xdg" / "rrm-jax" / "jax-compile"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))  # JAX's own variable over the default
    assert compile_cache.resolve(None) == tmp_path / "jax"
    monkeypatch.setenv(compile_cache.ENV, "OFF")  # ours over JAX's
    assert compile_cache.resolve(None) is None
    assert compile_cache.resolve(str(tmp_path / "flag")) == tmp_path / "flag"  # the flag over everything
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "env"))
    assert compile_cache.resolve(None) == tmp_path / "env"
    assert compile_cache.resolve("off") is None


@pytest.mark.parametrize("how", ["flag", "env"])
def test_a_cache_folder_that_cannot_be_made_is_one_line_and_exit_2(how, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    bad = str(blocker / "cache")
    argv = ["bench", "sample", "--preset", "tiny"]
    if how == "flag":
        argv += ["--compile-cache", bad]
    else:
        monkeypatch.setenv(compile_cache.ENV, bad)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and bad in err and "'off'" in err
    assert err.startswith(f"rrm-jax: error: {'--compile-cache' if how == 'flag' else compile_cache.ENV}:")
