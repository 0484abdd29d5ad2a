"""Rewards for judge rollouts, chosen by name so a config can switch them.

A reward function takes the generated text of one rollout and the position (1 or 2) of the
preferred response in its prompt, and returns a float. "rrm" is the RRM paper's reward: +1 when the
verdict parsed by the RRM parser picks the preferred response, -1 when it picks the other one or
cannot be parsed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from rrm_jax.errors import UserError
from rrm_jax.rrm.prompt import parse_verdict

RewardFn = Callable[[str, int], float]

REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str):
    """Decorator: make a reward function available as `reward: <name>` in configs."""

    def add(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = fn
        return fn

    return add


@register_reward("rrm")
def verdict_reward(generated_text: str, preferred: int) -> float:
    return 1.0 if parse_verdict(generated_text) == preferred else -1.0


def get_reward(name: str) -> RewardFn:
    if name not in REWARDS:
        raise UserError(f"unknown reward {name!r}; available: {', '.join(sorted(REWARDS))}")
    return REWARDS[name]


def compute_rewards(texts: Sequence[str], preferred: Sequence[int], *, reward: str = "rrm") -> np.ndarray:
    """Rewards [N] (float32) of N rollouts, each against the preferred position of its own prompt."""
    if len(texts) != len(preferred):
        raise ValueError(f"{len(texts)} texts but {len(preferred)} preferred positions")
    fn = get_reward(reward)
    return np.array([fn(t, p) for t, p in zip(texts, preferred)], dtype=np.float32)
