"""How samples are drawn: one frozen, validated record of the decoding options.

`Decoding` is what the judge holds, what the judge / rank / eval flags make and what the trainer's
config checks its `rollout` and `reward` sections with; the sampler (`sampling.make_settings`) checks
its own arguments with it too. A bad value is a UserError whose message starts with the option's
name ("top_p must be in (0, 1], got 0.0"), so a config can prefix its section ("reward.top_p ...").
No JAX here: the flags are built for `--help`, which must stay instant.
"""

from __future__ import annotations

import dataclasses

from rrm_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Decoding:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling mass; 1 = off
    top_k: int = 0  # 0 = off
    max_new_tokens: int | None = None  # None: as the generate callable decides (the judge: 8192 capped at the context)
    max_think_tokens: int | None = None  # thinking budget: `</think>` forced after this many tokens; None = no budget

    def __post_init__(self):
        problems = [
            (self.temperature < 0, f"temperature must be >= 0, got {self.temperature}"),
            (not 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k < 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (
                self.max_new_tokens is not None and self.max_new_tokens < 1,
                f"max_new_tokens must be >= 1, got {self.max_new_tokens}",
            ),
            (
                self.max_think_tokens is not None and self.max_think_tokens < 1,
                f"max_think_tokens must be >= 1, got {self.max_think_tokens}",
            ),
        ]
        for bad, message in problems:
            if bad:
                raise UserError(message)

    def options(self) -> dict:
        """The five values as keyword arguments of a generate callable (`rrm_jax.sample`'s names)."""
        return dataclasses.asdict(self)


def check(section: str, **values) -> Decoding:
    """Decoding(**values), its error (if any) naming the option inside `section` ("reward.top_p ...")."""
    try:
        return Decoding(**values)
    except UserError as e:
        raise UserError(f"{section}.{e}") from None
