"""Defences of a GRPO run against failing silently (the `guard` config section).

- A format signal distinct from a wrong verdict: every unparseable sample (and, when asked, every
  sample cut off at max_new_tokens) gets a fixed penalty added to its advantage AFTER the group
  normalisation. Inside a group an unparseable answer already scores like a wrong one; the penalty
  outside it is what keeps a gradient when a whole group, or the whole batch, is unparseable (group-
  relative advantages of equal rewards are all zero).
- Collapse detection: when the fraction of unparseable samples, or of groups whose rewards are all
  equal (while not all of them are right), stays at `collapse_threshold` for `collapse_steps` steps,
  learning has stopped for good; the trainer stops or rolls back (rrm_jax.rl.trainer).
- A warning when `truncated_fraction` climbs: rows that run to max_new_tokens without an end-of-
  sequence token are judged on cut-off text, and a judge that forgets to stop drifts out of format.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SIGNALS = {
    "unparseable": "every sample's verdict was unparseable",
    "judge_unparseable": "every verdict of the reward judge was unparseable",
    "zero_variance_groups": "every group's rewards were equal (no advantage, no gradient)",
}


def penalised_advantages(advantages, unparseable, truncated, *, format_penalty: float, truncation_penalty: float):
    """advantages [N] minus the format penalties of unparseable [N] and truncated [N] (0/1) samples."""
    advantages = np.asarray(advantages, np.float32)
    penalty = format_penalty * np.asarray(unparseable, np.float32) + truncation_penalty * np.asarray(
        truncated, np.float32
    )
    return advantages - penalty


def collapse_signals(row: dict, threshold: float) -> list[str]:
    """The collapse signals a step's metrics row shows (names of SIGNALS)."""
    shown = [key for key in ("unparseable", "judge_unparseable") if row.get(key, 0.0) >= threshold]
    # equal rewards in every group, unless every sample was right (a solved batch is not a stuck one;
    # a policy's row has no accuracy: equal rewards everywhere is a stuck run)
    if row["zero_variance_groups"] >= threshold and row.get("accuracy", 0.0) < 1.0:
        shown.append("zero_variance_groups")
    return shown


@dataclasses.dataclass
class Collapse:
    signal: str
    step: int  # the step it was detected at
    since: int  # the first step of the streak

    def describe(self) -> str:
        return (
            f"collapse at step {self.step}: {SIGNALS[self.signal]} for {self.step - self.since + 1} steps "
            f"(since step {self.since}; {self.signal} at 1.0)"
        )


class CollapseDetector:
    """Counts consecutive steps per signal; `observe` returns a Collapse once a streak reaches `steps`."""

    def __init__(self, steps: int, threshold: float = 1.0):
        self.steps, self.threshold = steps, threshold
        self.since: dict[str, int] = {}

    def observe(self, step_number: int, row: dict) -> Collapse | None:
        shown = collapse_signals(row, self.threshold)
        self.since = {s: self.since.get(s, step_number) for s in shown}
        for signal, since in self.since.items():
            if self.steps and step_number - since + 1 >= self.steps:
                return Collapse(signal, step_number, since)
        return None

    @property
    def streak_start(self) -> int | None:
        """First step of the oldest running streak (None when the last step was healthy)."""
        return min(self.since.values(), default=None)

    def reset(self) -> None:
        self.since = {}


class TruncationWatch:
    """One warning line when truncated_fraction reaches `threshold` (0 = never), another if it reaches 1.0."""

    def __init__(self, threshold: float, max_new_tokens: int):
        self.threshold, self.max_new_tokens = threshold, max_new_tokens
        self.warned_at: float | None = None

    def observe(self, step_number: int, truncated_fraction: float) -> str | None:
        if not self.threshold or truncated_fraction < self.threshold:
            return None
        level = 1.0 if truncated_fraction >= 1.0 else self.threshold
        if self.warned_at is not None and level <= self.warned_at:
            return None
        self.warned_at = level
        return (
            f"warning: step {step_number}: {truncated_fraction:.0%} of the samples ran to rollout.max_new_tokens="
            f"{self.max_new_tokens} without an end-of-sequence token (truncated_fraction); their rewards read "
            f"cut-off text. Raise rollout.max_new_tokens, or push back with guard.truncation_penalty"
        )
