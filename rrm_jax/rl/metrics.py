"""A training run's metrics: OUTPUT_DIR/metrics.jsonl (one JSON object per step) and TensorBoard events.

Process 0 writes them. A resume drops the rows written after the restored checkpoint (the resumed
run writes those steps again); a last line a crash cut short is dropped with them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rrm_jax import distributed, storage
from rrm_jax.errors import UserError

METRICS = "metrics.jsonl"  # the file in OUTPUT_DIR
TIMING_KEYS = ("step_time", "rollout_time", "judge_time", "update_time", "tokens_per_s", "elapsed")  # vary run to run


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl. A last line without its newline was cut short by a crash: dropped
    (the resume writes that step again); any other unreadable line is refused."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    rows = []
    for number, line in enumerate(text[: text.rfind("\n") + 1].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserError(
                f"{path} line {number} is not valid JSON (not a cut-short last line: the file is damaged); "
                f"repair or delete that line, then --resume again"
            ) from None
    return rows


class MetricsLog:
    """metrics.jsonl (appended and flushed to disk each step; on a bucket, whose objects cannot be
    appended to, uploaded whole each step) and TensorBoard events, written by process 0 only."""

    def __init__(self, output_dir: Path, resume_step: int | None):
        """resume_step: the restored step (-1: a resumed run restarting from scratch), None for a new run."""
        self.path = output_dir / METRICS
        self.enabled = distributed.is_main_process()
        if not self.enabled:
            return
        kept = ""
        if resume_step is not None and self.path.exists():
            # rows written after the restored checkpoint are repeated by this run: drop them
            kept = "".join(json.dumps(r) + "\n" for r in read_metrics(self.path) if r["step"] <= resume_step)
            storage.write_text(self.path, kept)
        if storage.can_append(self.path):
            self.file, self.text = open(self.path, "a", encoding="utf-8"), None
        else:
            self.file, self.text = None, kept
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(output_dir / "tb"), purge_step=None if resume_step is None else resume_step + 1)

    def rows(self) -> list[dict]:
        if not self.enabled:
            return []
        return read_metrics(self.path)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps(row) + "\n"
        if self.file is None:
            self.text += line
            storage.write_text(self.path, self.text)
        else:
            self.file.write(line)
            self.file.flush()
            os.fsync(self.file.fileno())
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.enabled:
            if self.file is not None:
                self.file.close()
            self.writer.close()


def current_attempt(rows: list[dict]) -> list[dict]:
    """The metrics rows of the run as it stands: rows a rollback abandoned, and the event rows, left out."""
    kept: list[dict] = []
    for row in rows:
        if row.get("action") == "rollback":
            kept = [r for r in kept if r["step"] <= row["rolled_back_to"]]
        elif "collapse" not in row:
            kept.append(row)
    return kept
