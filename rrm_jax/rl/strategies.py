"""Group rewards from a pairwise judge: each strategy turns the verdicts of one GRPO group into one reward per sample.

A strategy sees a step's groups (n groups of G samples) and a `compare` callable that judges a whole
round at once: it gets `(group, i, j)` triples, j = REFERENCE for the group's reference response, and
returns for each the winner (i or j) or None for a tie (a tie of votes, or no parseable vote). Every
comparison of one round over all groups is one `compare` call (knockout: one per round).

Scores: s(i, j) = 1 if i won, 0 if j won, 0.5 for a tie.
  round_robin  all G(G-1)/2 pairs; reward_i = mean of s(i, .) over its G-1 comparisons.
  elo          all pairs, applied in a seeded order (rrm_jax.rrm.rank.round_robin_order) as online ELO
               with the official constants (K 4, base 10, scale 400, start 1000); reward_i = the rating's
               z-score within the group, (R_i - mean) / std (0 when every rating is equal).
  knockout     the seeded bracket of `rrm-jax rank` (byes when G is no power of two), G-1 comparisons
               in ceil(log2 G) rounds, a tie advancing the first of the pair; reward_i = rounds won /
               ceil(log2 G), a bye counting as a round won (the sample advances without a comparison).
  circular     sample i against i+1 (mod G); reward_i = the mean of its two scores, s(i, i+1) and s(i, i-1).
  reference    each sample against the row's reference response; reward_i = +1 won, -1 lost, 0 tie.
The rewards then go through the usual group advantages (rrm_jax.rl.grpo.group_advantages).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from rrm_jax.errors import UserError
from rrm_jax.rrm import rank

REFERENCE = -1  # the opponent index of a group's reference response
STRATEGIES = ("round_robin", "elo", "knockout", "circular", "reference")
PAIRWISE = ("round_robin", "elo", "knockout", "circular")  # compare samples with each other: G >= 2

Compare = Callable[[list[tuple[int, int, int]]], list[int | None]]


def check_strategy(strategy: str, group_size: int) -> None:
    if strategy not in STRATEGIES:
        raise UserError(f"reward.strategy={strategy!r} is not a strategy; use one of {', '.join(STRATEGIES)}")
    if strategy in PAIRWISE and group_size < 2:
        raise UserError(
            f"reward.strategy={strategy} compares the samples of one group with each other: "
            f"rollout.samples_per_prompt must be >= 2 (got {group_size}); strategy=reference "
            f"compares each sample with the row's reference and works with one"
        )


def rounds(strategy: str, group_size: int) -> int:
    """Judge calls per step: one, except a knockout's ceil(log2 G) rounds."""
    check_strategy(strategy, group_size)
    return math.ceil(math.log2(group_size)) if strategy == "knockout" and group_size > 1 else 1


def score(i: int, winner: int | None) -> float:
    return 0.5 if winner is None else float(winner == i)


def group_rewards(strategy: str, n_groups: int, group_size: int, compare: Compare, *, seed: int = 0) -> np.ndarray:
    """Rewards [n_groups, G] (float32) of every sample of every group."""
    check_strategy(strategy, group_size)
    G = group_size
    if strategy == "elo":
        results = rank.elo_round_robin_many([G] * n_groups, compare, seed=seed)
        ratings = np.array([r.ratings for r in results], np.float64)
        spread = ratings.std(axis=1, keepdims=True)
        z = np.where(spread > 0, (ratings - ratings.mean(axis=1, keepdims=True)) / np.where(spread > 0, spread, 1), 0.0)
        return z.astype(np.float32)
    if strategy == "knockout":
        total = rounds(strategy, G)
        won = np.zeros((n_groups, G))
        for g, result in enumerate(rank.knockout_many([G] * n_groups, compare, seed=seed)):
            won[g, result.byes] += 1
            for matches in result.rounds:
                for _, _, winner in matches:
                    won[g, winner] += 1
        return (won / total).astype(np.float32)
    if strategy == "reference":
        batch = [(g, i, REFERENCE) for g in range(n_groups) for i in range(G)]
        winners = _checked(batch, compare(batch))
        return np.array([2 * score(i, w) - 1 for (_, i, _), w in zip(batch, winners)], np.float32).reshape(n_groups, G)
    if strategy == "round_robin":
        batch = [(g, i, j) for g in range(n_groups) for i in range(G) for j in range(i + 1, G)]
    else:  # circular
        batch = [(g, i, (i + 1) % G) for g in range(n_groups) for i in range(G)]
    winners = _checked(batch, compare(batch))
    totals = np.zeros((n_groups, G))
    counts = np.zeros((n_groups, G))
    for (g, i, j), w in zip(batch, winners):
        totals[g, i] += score(i, w)
        totals[g, j] += score(j, w)
        counts[g, i] += 1
        counts[g, j] += 1
    return (totals / counts).astype(np.float32)


def _checked(batch: Sequence[tuple[int, int, int]], winners: Sequence[int | None]) -> list[int | None]:
    if len(winners) != len(batch):
        raise RuntimeError(f"compare returned {len(winners)} winners for {len(batch)} comparisons")
    for (g, i, j), w in zip(batch, winners):
        if w not in (None, i, j):
            raise RuntimeError(f"compare named {w} the winner of ({g}, {i}, {j})")
    return list(winners)
