"""JAX's persistent compilation cache for the device commands (generate, judge, rank, eval, bench, train).

A compiled XLA program is written to a folder on disk and read back by the next process that compiles the
same program on the same kind of device, so running a command again skips its compilation (tens of
seconds per program on a GPU for the larger models). Where the folder is, first match wins:

  1. `--compile-cache DIR` (or `--compile-cache off`);
  2. $RRM_JAX_COMPILE_CACHE (a folder, or `off`);
  3. JAX's own setting, when $JAX_COMPILATION_CACHE_DIR is set;
  4. $XDG_CACHE_HOME/rrm-jax/jax-compile, by default ~/.cache/rrm-jax/jax-compile.

Every program is cached however quickly it compiled and however small it is (the serving stacks' settings:
the per-program threshold of 1 s JAX applies by default leaves the many sub-second programs of a judging run
compiling on every start); GPU autotuning results are cached beside them. JAX's own environment variables for
these two thresholds, when set, win. The cache must be configured before the first compilation in the
process, so the CLI does it before anything touches a device. The folder grows with each new model shape /
batch size / device kind; deleting it is always safe.

$RRM_JAX_COMPILE_REPORT=1 (internal, for tests and benchmarks) prints one line to stderr when the command ends:
`rrm-jax compile-report {"backend_compile_s": ..., "cache_hits": ..., "cache_misses": ..., "cache_dir": ...}`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rrm_jax.errors import UserError

ENV = "RRM_JAX_COMPILE_CACHE"
REPORT_ENV = "RRM_JAX_COMPILE_REPORT"
OFF = "off"
REPORT_PREFIX = "rrm-jax compile-report "

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # wraps the cache lookup and, on a miss, the compile
_HITS = "/jax/compilation_cache/cache_hits"
_MISSES = "/jax/compilation_cache/cache_misses"


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rrm-jax" / "jax-compile"


def add_cli_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compile-cache",
        metavar="DIR|off",
        default=None,
        help=f"folder of JAX's persistent compilation cache, or 'off' (default: ${ENV}, else "
        f"$JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME/rrm-jax/jax-compile, "
        f"~/.cache/rrm-jax/jax-compile without XDG_CACHE_HOME)",
    )


def resolve(flag: str | None) -> Path | None:
    """The cache folder the flag / environment ask for, or None when caching is off."""
    for value in (flag, os.environ.get(ENV), os.environ.get("JAX_COMPILATION_CACHE_DIR")):
        if value is not None and value.strip():
            value = value.strip()
            return None if value.lower() == OFF else Path(value).expanduser()
    return default_dir()


def setup(flag: str | None) -> Path | None:
    """Turn the persistent cache on (or leave it off) before the first compilation; -> the folder or None.

    Raises UserError when the folder cannot be created or written."""
    path = resolve(flag)
    if os.environ.get(REPORT_ENV):
        _start_report()
    if path is None:
        return None
    where = "--compile-cache" if flag else (ENV if os.environ.get(ENV) else "the compilation cache folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{where}: cannot create {path} ({e.strerror}); give another folder or 'off'") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{where}: {path} is not writable; give another folder or 'off'")
    import jax

    jax.config.update("jax_compilation_cache_dir", str(path))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if "JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES" not in os.environ:
        jax.config.update("jax_persistent_cache_enable_xla_caches", "xla_gpu_per_fusion_autotune_cache_dir")
    _report["cache_dir"] = str(path)
    return path


_report: dict = {"backend_compile_s": 0.0, "cache_hits": 0, "cache_misses": 0, "cache_dir": None}
_listening = False


def _start_report() -> None:
    global _listening
    if _listening:  # jax.monitoring listeners are process-wide: register once
        return
    import jax

    def on_event(event, **_):
        if event == _HITS:
            _report["cache_hits"] += 1
        elif event == _MISSES:
            _report["cache_misses"] += 1

    def on_duration(event, duration, **_):
        if event == _BACKEND_COMPILE:
            _report["backend_compile_s"] += duration

    jax.monitoring.register_event_listener(on_event)
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    _listening = True


def print_report() -> None:
    """The compile-report line on stderr, when $RRM_JAX_COMPILE_REPORT asks for it."""
    if os.environ.get(REPORT_ENV) and _listening:
        print(REPORT_PREFIX + json.dumps(_report), file=sys.stderr, flush=True)
