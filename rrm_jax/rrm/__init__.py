"""Judging with Reward Reasoning Models: the prompt and verdict parser (prompt), batched pairwise judging
with voting (judge), best-of-N by ELO round robin or knockout (rank), and the released models' constants (spec).
The commands: what `judge`, `rank` and `eval` share (judge_commands), `rrm-jax judge` (judge_cli) and
`rrm-jax rank` (rank)."""

from rrm_jax.rrm.judge import Comparison, Judge, Judgment
from rrm_jax.rrm.prompt import PromptEncoder, encode, parse_verdict, render, render_ids
from rrm_jax.rrm.rank import elo_ratings, elo_round_robin, elo_round_robin_many, knockout, knockout_many

__all__ = [
    "Comparison",
    "Judge",
    "Judgment",
    "PromptEncoder",
    "elo_ratings",
    "elo_round_robin",
    "elo_round_robin_many",
    "encode",
    "knockout",
    "knockout_many",
    "parse_verdict",
    "render",
    "render_ids",
]
