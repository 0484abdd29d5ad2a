"""The metrics every task logs about a step's rollout: lengths, truncation, groups without a signal."""

from __future__ import annotations

import numpy as np

from rrm_jax import generate


def truncated(samples) -> np.ndarray:
    """[R] bool: the samples that ran to max_new_tokens."""
    return np.array([s.finish_reason == generate.FINISH_LENGTH for s in samples])


def rollout_stats(samples, rewards: np.ndarray, group_size: int) -> dict:
    lengths = np.array([len(s.output_ids) for s in samples])
    by_group = np.asarray(rewards).reshape(-1, group_size)
    return {
        "response_len_mean": float(lengths.mean()),
        "response_len_max": int(lengths.max()),
        "truncated_fraction": float(truncated(samples).mean()),
        "zero_variance_groups": float(np.mean(by_group.max(axis=1) == by_group.min(axis=1))),
        "tokens_generated": int(lengths.sum()),  # popped by the trainer for tokens_per_s
    }
