"""`rrm-jax train` in a fresh process, optionally sent a signal after a step (the resume tests)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train_subprocess(
    argv: list[str], crash_after: int | None = None, signum: int = signal.SIGKILL
) -> subprocess.CompletedProcess:
    """`rrm-jax <argv>`; crash_after=N sends `signum` to the process right after step N is logged: by
    default SIGKILL, no chance to clean up, exactly like kill -9."""
    hook = ""
    if crash_after is not None:
        hook = textwrap.dedent(f"""
            import os, signal
            from rrm_jax.rl import trainer
            log = trainer.MetricsLog.log
            def log_then_crash(self, row):
                log(self, row)
                if row["step"] == {crash_after}:
                    os.kill(os.getpid(), {int(signum)})
            trainer.MetricsLog.log = log_then_crash
        """)
    code = hook + "\nimport sys\nfrom rrm_jax.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True, text=True, timeout=300)


def split_flags(extra) -> tuple[list[str], list[str]]:
    """(--flags, key=value overrides): the train CLI takes its flags before the overrides."""
    flags = [e for e in extra if e.startswith("--")]
    return flags, [e for e in extra if e not in flags]
