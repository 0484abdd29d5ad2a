"""The curve of a finished training run, OUTPUT_DIR/curve.png: the task draws it, this writes it whole."""

from __future__ import annotations

import io
from pathlib import Path

from rrm_jax import storage
from rrm_jax.rl.task import Task


def plot_curve(rows: list[dict], path: Path, task: Task) -> None:
    import matplotlib  # here, not at import time: only a finished run draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    task.plot(rows, ax)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(path, png.getvalue())
