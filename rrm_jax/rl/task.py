"""What a training task gives the GRPO trainer: the contract JudgeTask and PolicyTask share.

The trainer (rrm_jax/rl/trainer.py) runs one loop for every kind of run and asks its task for what
differs: the step's prompts, the rewards of their samples, the held-out evaluation, the format
warm-up batches, the held-out file, the progress-bar figures, the summary and the curve. Two tasks
implement it: judge training (rrm_jax/rl/judge_task.py) and policy training (rrm_jax/rl/policy.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np


class ResumableIterator(Protocol):
    """The task's stream of this process's batches (a grain iterator): its position goes into the
    checkpoint, so a resumed run draws the batches the uninterrupted one would have."""

    def __next__(self) -> Any: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


class Task(Protocol):
    batches: ResumableIterator

    def next_batch(self) -> tuple[list[list[int]], Any]:
        """(prompt ids, context) of the whole step, the same in every process; the context (labels,
        prompts) goes back to `score` with the samples."""
        ...

    def score(self, samples, context, *, seed: int) -> tuple[np.ndarray, dict]:
        """(advantages [R], metrics) of one step's samples, prompt-major with G per prompt. The metrics
        include the rollout statistics (rrm_jax/rl/rollout_stats.py), which the trainer and the guard read."""
        ...

    def evaluate(self, model) -> dict:
        """The held-out evaluation's figures, logged at step 0 and every eval_every steps."""
        ...

    def step_progress(self, row: dict) -> dict:
        """The progress bar's figures of a training step's metrics row."""
        ...

    def eval_progress(self, row: dict) -> dict:
        """The progress bar's figures of an evaluation row ({} for a row without one)."""
        ...

    def warmup_batch(self, batch_size: int, rng: np.random.Generator) -> dict:
        """A supervised format warm-up batch: `tokens` and `loss_mask` [batch_size, T]."""
        ...

    def write_heldout(self, path: Path) -> None:
        """Write the held-out items (OUTPUT_DIR/heldout.jsonl) whole."""
        ...

    def summary(self, rows: list[dict], output_dir: Path, step_dir: Path, exe: str, context: int) -> list[str]:
        """What a finished run prints above the export command: the held-out figures, the checkpoint
        and commands that try it (`exe`: how to call rrm-jax; `context`: the model's context length)."""
        ...

    def plot(self, rows: list[dict], ax) -> None:
        """Draw the run's curve on a matplotlib axis."""
        ...
