"""Judge training (`reward.type: rrm`): the trainer's task for GRPO of an RRM on preference pairs.

The trainer (rrm_jax/rl/trainer.py) asks its task for the step's prompts, the rewards of their
samples, the held-out evaluation, the format warm-up batches and the end-of-run summary. Here: judge
prompts of preference pairs (or the toy task), the verdict reward (rrm_jax/rl/reward.py) against the
pair's label with the guard's format penalty, and greedy held-out accuracy (`eval_accuracy`).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import jax
import numpy as np

from rrm_jax import distributed, generate, storage
from rrm_jax.data import toy
from rrm_jax.data.preference import JudgeExample, PreferenceDataset, preference_batches, read_preferences, split_heldout
from rrm_jax.errors import UserError
from rrm_jax.rl import grpo, guard
from rrm_jax.rl.config import TrainConfig
from rrm_jax.rl.reward import compute_rewards
from rrm_jax.rl.rollout_stats import rollout_stats, truncated
from rrm_jax.rrm.judge import Comparison, is_swapped
from rrm_jax.rrm.prompt import PromptEncoder, parse_verdict, render

EVAL_SEED = 0  # `rrm-jax eval`'s default --seed: which pairs it shows swapped


def load_pairs(c: TrainConfig):
    """(train pairs, held-out pairs, render function)."""
    if c.data.source == "toy":
        heldout = int(c.data.heldout)
        return (
            toy.make_toy_pairs(c.data.train_size, c.seed),
            toy.make_toy_pairs(heldout, c.seed, split="heldout"),
            toy.render_toy,
        )
    pairs = read_preferences(c.data.source, dataset_config=c.data.dataset_config, dataset_split=c.data.dataset_split)
    # the config stores heldout as a float: 500 (a count) arrives as 500.0, which split_heldout reads as a fraction
    count_or_fraction = int(c.data.heldout) if c.data.heldout >= 1 else c.data.heldout
    train, heldout = split_heldout(pairs, count_or_fraction, seed=c.seed)
    if not train or not heldout:
        raise UserError(
            f"{c.data.source}: {len(pairs)} pairs leave {len(train)} for training and {len(heldout)} "
            f"held out (data.heldout={c.data.heldout}); both need at least one"
        )
    return train, heldout, render


def write_pairs(path: Path, pairs) -> None:
    """`{prompt, chosen, rejected}` JSONL, written to a temp file and renamed (as config.yaml is)."""
    storage.write_text(
        path, "".join(json.dumps({"prompt": p.query, "chosen": p.chosen, "rejected": p.rejected}) + "\n" for p in pairs)
    )


def heldout_examples(pairs, tokenizer, render_fn, max_prompt_len: int) -> list[JudgeExample]:
    """One prompt per held-out pair, in the A/B order `rrm-jax eval --format pairs` (seed 0) shows it,
    so the trainer's held-out accuracy and that command's read the same prompts."""
    examples, prompts = [], PromptEncoder(tokenizer, render_fn=render_fn)
    for pair in pairs:
        swapped = is_swapped(Comparison(pair.query, pair.chosen, pair.rejected), EVAL_SEED)
        first, second = (pair.rejected, pair.chosen) if swapped else (pair.chosen, pair.rejected)
        text = render_fn(tokenizer, pair.query, first, second)
        ids = prompts(pair.query, first, second)
        if len(ids) <= max_prompt_len:
            examples.append(JudgeExample(pair.query, first, second, 2 if swapped else 1, text, ids, pair.origin))
    return examples


def global_batch(examples, width: int) -> tuple[list[list[int]], list[int]]:
    """(prompt ids, labels) of the whole step: every process's slice of the batch, in process order.
    Only token ids and labels travel; each process rendered and tokenized its own slice."""
    if jax.process_count() == 1:
        return [e.prompt_ids for e in examples], [e.label for e in examples]
    ids = np.zeros((len(examples), width), np.int32)
    lengths = np.array([len(e.prompt_ids) for e in examples], np.int32)
    for i, e in enumerate(examples):
        ids[i, : len(e.prompt_ids)] = e.prompt_ids
    labels = np.array([e.label for e in examples], np.int32)
    ids, lengths, labels = (distributed.gather_processes(a).reshape(-1, *a.shape[1:]) for a in (ids, lengths, labels))
    return [row[:n].tolist() for row, n in zip(ids, lengths)], labels.tolist()


def evaluate(model, examples, tokenizer, max_new_tokens: int, kv_pool_gb: float | None = None) -> dict:
    """Held-out accuracy of greedy verdicts parsed by the RRM parser (in the rollout's KV page pool)."""
    outs = generate.sample(
        model,
        [e.prompt_ids for e in examples],
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        tokenizer=tokenizer,
        kv_pool_gb=kv_pool_gb,
    )
    verdicts = [parse_verdict(o.text) for o in outs]
    return {
        "eval_accuracy": float(np.mean([v == e.label for v, e in zip(verdicts, examples)])),
        "eval_unparseable": float(np.mean([v is None for v in verdicts])),
    }


class JudgeTask:
    kind = "judge"

    def __init__(self, c: TrainConfig, tokenizer):
        self.c, self.tokenizer = c, tokenizer
        train_pairs, self.heldout_pairs, render_fn = load_pairs(c)
        dataset = PreferenceDataset(
            train_pairs,
            tokenizer=tokenizer,
            render=render_fn,
            max_prompt_len=c.data.max_prompt_len,
            seed=c.seed,
            orders=c.data.orders,
        )
        self.heldout = heldout_examples(
            self.heldout_pairs, tokenizer, render_fn, c.data.max_prompt_len
        )  # every process: all
        if dataset.markers_neutralised and distributed.is_main_process():
            print(
                f"warning: {dataset.markers_neutralised} control markers (such as <｜User｜>, </think> or the "
                f"end-of-sentence token) written in the training pairs' queries or responses are tokenized as "
                f"plain text, not as control tokens",
                file=sys.stderr,
            )
        self.batches = iter(
            preference_batches(dataset, batch_size=c.rollout.prompts_per_step, seed=c.seed)
        )  # this process's slice

    def next_batch(self) -> tuple[list[list[int]], list[int]]:
        return global_batch(next(self.batches), self.c.data.max_prompt_len)

    def score(self, samples, labels: list[int], *, seed: int) -> tuple[np.ndarray, dict]:
        """(advantages [R], metrics): the verdict reward, group advantages with the format signal."""
        c, G = self.c, self.c.rollout.samples_per_prompt
        preferred = np.repeat(labels, G)
        texts = [s.text for s in samples]
        rewards = compute_rewards(texts, preferred, reward=c.reward.type)
        verdicts = [parse_verdict(t) for t in texts]
        unparseable = np.array([v is None for v in verdicts])
        advantages = guard.penalised_advantages(
            np.asarray(grpo.group_advantages(rewards, G, normalize_std=c.loss.normalize_std)),
            unparseable,
            truncated(samples),
            format_penalty=c.guard.format_penalty,
            truncation_penalty=c.guard.truncation_penalty,
        )
        stats = {
            "reward_mean": float(rewards.mean()),
            "accuracy": float(np.mean([v == p for v, p in zip(verdicts, preferred)])),
            "unparseable": float(unparseable.mean()),
            **rollout_stats(samples, rewards, G),
        }
        return advantages, stats

    def evaluate(self, model) -> dict:
        return evaluate(model, self.heldout, self.tokenizer, self.c.rollout.max_new_tokens, self.c.rollout.kv_pool_gb)

    @staticmethod
    def step_progress(row: dict) -> dict:
        """The progress bar's figures of a training step: reward and the verdicts' accuracy."""
        return {"reward": f"{row['reward_mean']:.2f}", "acc": f"{row['accuracy']:.2f}"}

    @staticmethod
    def eval_progress(row: dict) -> dict:
        """The progress bar's figures of an evaluation row ({} for a row without one)."""
        return {"eval": f"{row['eval_accuracy']:.3f}"} if "eval_accuracy" in row else {}

    def warmup_batch(self, batch_size: int, rng: np.random.Generator) -> dict:
        return toy.format_warmup_batch(self.tokenizer, batch_size, rng)

    def write_heldout(self, path: Path) -> None:
        write_pairs(path, self.heldout_pairs)

    def summary(self, rows: list[dict], output_dir: Path, step_dir: Path, exe: str, context: int) -> list[str]:
        evals = [r for r in rows if "eval_accuracy" in r]
        out, lines = str(output_dir), []
        if evals:
            best = max(evals, key=lambda r: r["eval_accuracy"])
            reached = next((r for r in evals if r["eval_accuracy"] >= 0.9), None)
            lines.append(
                f"held-out accuracy (greedy, {len(self.heldout)} pairs of {output_dir / 'heldout.jsonl'}, each in "
                f"the A/B order `rrm-jax eval` shows it): {evals[0]['eval_accuracy']:.3f} at step "
                f"{evals[0]['step']} -> {evals[-1]['eval_accuracy']:.3f} at step {evals[-1]['step']} "
                f"(best {best['eval_accuracy']:.3f})"
            )
            if reached:
                lines.append(f"first >= 0.90 at step {reached['step']}, {reached['elapsed']:.0f} s after start")
            lines.append(
                f"  `rrm-jax eval` below reads the same prompts from the latest checkpoint; it credits an "
                f"unparseable verdict 0.5 where this counts 0 (unparseable at step {evals[-1]['step']}: "
                f"{evals[-1]['eval_unparseable']:.1%}), so the two agree up to that and float rounding"
            )
        lines.append(
            f"checkpoint: {step_dir}  (metrics: {output_dir / 'metrics.jsonl'}, curve: {output_dir / 'curve.png'})"
        )
        tokens = self.c.rollout.max_new_tokens
        lines.append(
            f"try it (--max-new-tokens {tokens}: the toy judge's answer is 5 tokens and its context {context}):"
        )
        if self.c.data.source == "toy":
            e = self.heldout[0]  # a letter the task trains on
            lines.append(
                f"  {exe} judge --model {out} --query {shlex.quote(e.query)} --response-1 {e.response_1} "
                f"--response-2 {e.response_2} --temperature 0 --max-new-tokens {tokens}"
            )
        lines.append(
            f"  {exe} eval --model {out} --input {output_dir / 'heldout.jsonl'} --format pairs --output "
            f"{output_dir / 'eval.json'} --temperature 0 --max-new-tokens {tokens}"
        )
        return lines

    def plot(self, rows: list[dict], ax) -> None:
        train = [r for r in rows if "reward_mean" in r]
        evals = [r for r in rows if "eval_accuracy" in r]
        ax.plot([r["step"] for r in train], [r["accuracy"] for r in train], label="train accuracy (sampled)", alpha=0.6)
        ax.plot(
            [r["step"] for r in evals], [r["eval_accuracy"] for r in evals], "o-", label="held-out accuracy (greedy)"
        )
        ax.axhline(0.9, color="gray", ls="--", lw=0.8)
        ax.axhline(0.5, color="gray", ls=":", lw=0.8)
        ax.set_xlabel("GRPO step")
        ax.set_ylabel("pairwise accuracy")
        ax.set_ylim(0, 1)
        ax.legend(loc="lower right")
