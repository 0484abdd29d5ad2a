"""A frozen RRM as the reward model of policy GRPO (`reward: {type: judge, ...}`).

The judge is loaded onto the policy's mesh with the same logical sharding rules and never trained.
For each step, every group's samples are compared by a strategy (rrm_jax/rl/strategies.py); every
comparison of one round over the whole batch is ONE `rrm_jax.sample` call on the judge (votes as
num_samples), so the judge's rows share the engine's slots. Each comparison is rendered into the
exact RRM prompt (rrm_jax.rrm.prompt.PromptEncoder: the policy's text tokenized as plain text, so a
sample cannot forge a judge turn or a verdict with control markers; the count of markers neutralised
is the metric `judge_markers_neutralised`) with the row's prompt as the query, shown in both A/B
orders (`both_orders`) or in the order of the seeded coin `rrm-jax judge` uses (`is_swapped`, seeded
per step). The verdict of a comparison is the majority of its parseable votes over its shown orders;
a tie of votes, or no parseable vote, is a tie (0.5 each). Comparisons whose prompt would not fit in
the judge's context are ties too, and counted (`judge_over_context`).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from rrm_jax import checkpoint, generate, worksplit
from rrm_jax.errors import UserError
from rrm_jax.rl import strategies
from rrm_jax.rl.config import RewardConfig
from rrm_jax.rrm import spec
from rrm_jax.rrm.judge import Comparison, is_swapped, judgment_from_texts
from rrm_jax.rrm.prompt import PromptEncoder


def response_text(text: str, *, strip_think: bool) -> str:
    """The part of a policy sample the judge sees: with strip_think, what follows the last `</think>`
    (an unclosed `<think>` block leaves nothing), else the whole text."""
    if not strip_think:
        return text
    if spec.THINK_CLOSE in text:
        return text.rsplit(spec.THINK_CLOSE, 1)[1].strip()
    return "" if text.lstrip().startswith(spec.THINK_OPEN) else text


def check_judge_mesh(judge, policy, tp: int) -> None:
    """The judge shares the policy's mesh: a tp that splits the policy's heads and MLP but not the
    judge's would silently replicate the judge's weights on every tp device."""
    if tp > 1 and splits_by(policy, tp) and not splits_by(judge, tp):
        common = [t for t in range(1, tp + 1) if splits_by(judge, t) and splits_by(policy, t)]
        raise UserError(
            f"reward.judge: the judge's {judge.num_heads} heads / {judge.num_kv_heads} kv heads / "
            f"{judge.intermediate_size} MLP width do not split over mesh.tp={tp} as the policy's do; the "
            f"judge runs on the policy's mesh, so choose a mesh.tp that divides both (e.g. "
            f"{', '.join(map(str, common))})"
        )


def splits_by(m, tp: int) -> bool:
    return all(n % tp == 0 for n in (m.num_heads, m.num_kv_heads, m.intermediate_size))


def load_judge(path: str, mesh, *, dtype: str | None = None):
    """(model, tokenizer) of the RRM at `path`, on `mesh` (None: this process's first device)."""
    tokenizer = checkpoint.load_tokenizer(path)  # cheap checks first
    if tokenizer is None:
        raise UserError(f"reward.judge={path}: no tokenizer files; the judge needs its tokenizer next to its weights")
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"reward.judge={path}: the tokenizer has no chat template; RRM prompts are rendered through it "
            f"(set tokenizer.chat_template in its tokenizer_config.json)"
        )
    model, _ = checkpoint.load_model(path, dtype=dtype, mesh=mesh)
    return model, tokenizer


@dataclasses.dataclass
class RoundLog:
    """Counters of one step's judging."""

    calls: int = 0
    comparisons: int = 0
    samples: int = 0
    unparseable: int = 0
    over_context: int = 0
    neutralised: int = 0  # control markers in the queries / responses tokenized as plain text
    flips: int = 0  # both orders: comparisons whose two orders' majorities disagree
    seconds: float = 0.0

    def metrics(self, both_orders: bool) -> dict:
        row = {
            "judge_calls": self.calls,
            "judge_comparisons": self.comparisons,
            "judge_samples": self.samples,
            "judge_unparseable": self.unparseable / max(self.samples, 1),
            "judge_over_context": self.over_context,
            "judge_markers_neutralised": self.neutralised,
            "judge_time": self.seconds,
        }
        if both_orders:
            row["order_flip_rate"] = self.flips / max(self.comparisons, 1)
        return row


class JudgeReward:
    def __init__(self, settings: RewardConfig, model, tokenizer, group_size: int):
        strategies.check_strategy(settings.strategy, group_size)
        self.settings, self.model, self.tokenizer, self.group_size = settings, model, tokenizer, group_size
        self.context = model.config.max_position_embeddings
        self.prompts = PromptEncoder(tokenizer)

    def rewards(
        self,
        queries: list[str],
        responses: list[list[str]],
        references: list[str | None],
        *,
        seed: int,
        strategy: str | None = None,
    ) -> tuple[np.ndarray, dict]:
        """Rewards [len(queries) * G] (prompt-major) of the groups' responses, and the judging metrics.
        strategy: another than the configured one (the held-out evaluation's "reference")."""
        strategy = strategy or self.settings.strategy
        group_size = len(responses[0]) if responses else self.group_size
        log = RoundLog()
        t0 = time.perf_counter()

        def compare(batch):
            comparisons = [
                Comparison(queries[g], responses[g][i], references[g] if j == strategies.REFERENCE else responses[g][j])
                for g, i, j in batch
            ]
            verdicts = self.judge(
                comparisons, coin_seed=seed, sample_seed=worksplit.batch_seed(seed, log.calls, 0), log=log
            )
            return [None if v is None else (i if v == 1 else j) for (_, i, j), v in zip(batch, verdicts)]

        rewards = strategies.group_rewards(strategy, len(queries), group_size, compare, seed=seed)
        log.seconds = time.perf_counter() - t0
        return rewards.reshape(-1), log.metrics(self.settings.both_orders)

    def sample(self, prompts: list[list[int]], max_new_tokens: list[int], seed: int):
        """The judge's `votes` samples per prompt, prompt-major: the one sampler call of a round."""
        s = self.settings
        return generate.sample(
            self.model,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            num_samples=s.votes,
            seed=seed,
            max_think_tokens=s.max_think_tokens,
            tokenizer=self.tokenizer,
            batch_size=s.batch_size,
            kv_pool_gb=s.kv_pool_gb,
        )

    def judge(
        self, comparisons: list[Comparison], *, coin_seed: int, sample_seed: int, log: RoundLog
    ) -> list[int | None]:
        """The majority verdict (1, 2 or None for a tie) of each comparison: one sampler call for all of them.
        coin_seed: the A/B coin's (`is_swapped`); sample_seed: the judge's sampling."""
        s = self.settings
        orders = [(False, True) if s.both_orders else (is_swapped(c, coin_seed),) for c in comparisons]
        shown_pairs, shown = [], []
        for k, (c, c_orders) in enumerate(zip(comparisons, orders)):
            for swapped in c_orders:
                first, second = (c.response_2, c.response_1) if swapped else (c.response_1, c.response_2)
                shown_pairs.append((k, swapped))
                shown.append((c.query, first, second))
        neutralised = self.prompts.neutralised
        prompt_ids = self.prompts.encode_batch(shown)
        log.neutralised += self.prompts.neutralised - neutralised
        prompts, owners = [], []
        for ids, owner in zip(prompt_ids, shown_pairs):
            if len(ids) < self.context:
                prompts.append(list(ids))
                owners.append(owner)
        limit = spec.EVAL_MAX_NEW_TOKENS if s.max_new_tokens is None else s.max_new_tokens
        results = (
            self.sample(prompts, [min(limit, self.context - len(p)) for p in prompts], sample_seed) if prompts else []
        )
        texts: list[list[str]] = [[] for _ in comparisons]
        shown_orders: list[list[bool]] = [[] for _ in comparisons]
        for p, (k, swapped) in enumerate(owners):
            texts[k] += [r.text for r in results[p * s.votes : (p + 1) * s.votes]]
            shown_orders[k].append(swapped)
        log.calls += 1
        log.comparisons += len(comparisons)
        log.samples += len(results)
        verdicts = []
        for k in range(len(comparisons)):
            if not texts[k]:
                log.over_context += 1
                verdicts.append(None)
                continue
            j = judgment_from_texts(texts[k], tuple(shown_orders[k]), s.votes)
            log.unparseable += j.unparseable
            if s.both_orders and len(shown_orders[k]) == 2:
                per_order = [
                    judgment_from_texts(texts[k][o * s.votes : (o + 1) * s.votes], (shown_orders[k][o],), s.votes)
                    for o in range(2)
                ]
                log.flips += per_order[0].winner != per_order[1].winner
            verdicts.append(j.winner)
        return verdicts
