"""`rrm-jax train`: its flags, apart from rrm_jax.rl.trainer so that `rrm-jax train --help` does not import JAX."""

from __future__ import annotations

import argparse


def _run(args) -> int:
    from rrm_jax.rl import trainer

    return trainer.run_train(args)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="training YAML (default: the embedded toy task)")
    parser.add_argument("--output-dir", default="runs/toy", help="run folder")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --output-dir from its latest checkpoint"
    )
    parser.add_argument("--export-hf", default=None, help="also write the final model as a Hugging Face folder here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. max_steps=300 seed=1 rollout.temperature=0.8",
    )
    parser.set_defaults(run=_run)
