"""Policy training with an RRM as the reward model (`reward.type: judge`): the trainer's task for it.

The trainer (rrm_jax/rl/trainer.py) runs the same GRPO loop for both kinds of run and asks its task
for what differs: the step's prompts, the rewards of their samples, the held-out evaluation, the
format warm-up batches and the end-of-run summary. This module is the policy's task:

- prompts: rows `{prompt}` / `{prompt, reference}` (rrm_jax/data/prompts.py), or the toy queries
  ("avoid x") when data.source=toy;
- rewards: a frozen judge on the same mesh compares each group's samples (rrm_jax/rl/judge_reward.py,
  strategies in rrm_jax/rl/strategies.py), then the usual group advantages;
- evaluation (every eval_every steps and at step 0): one sample per held-out prompt at temperature 1;
  `heldout_response_len`; on the toy task `heldout_banned_rate`, the fraction of those samples that
  contain the query's banned letter (a diagnostic the policy never trains on); with references,
  `heldout_reference_win_rate`, the judge's wins (ties 0.5) of the samples against the references.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import jax
import numpy as np

from rrm_jax import distributed, generate, plan, storage
from rrm_jax.data import toy
from rrm_jax.data.preference import preference_batches, split_heldout
from rrm_jax.data.prompts import PolicyPrompt, PromptDataset, read_prompts
from rrm_jax.errors import UserError
from rrm_jax.rl import grpo, guard, strategies
from rrm_jax.rl.config import TrainConfig
from rrm_jax.rl.judge_reward import JudgeReward, check_judge_mesh, load_judge, response_text
from rrm_jax.rl.rollout_stats import rollout_stats, truncated

EVAL_TEMPERATURE = 1.0
EVAL_SEED = 1  # the held-out samples' seed, the same at every evaluation
CURVE_KEY = "heldout_banned_rate"


class PolicyTask:
    kind = "policy"

    def __init__(self, c: TrainConfig, tokenizer, mesh, policy_shape, allowed_ids: tuple[int, ...] = ()):
        self.c, self.tokenizer = c, tokenizer
        self.allowed_ids = allowed_ids  # rollout.allowed_tokens' ids: the evaluation samples as the rollout does
        G = c.rollout.samples_per_prompt
        strategies.check_strategy(c.reward.strategy, G)  # before the judge's weights load
        train_rows, heldout_rows = self._rows(c)
        if c.reward.strategy == "reference":
            missing = next((r for r in train_rows + heldout_rows if r.reference is None), None)
            if missing is not None:
                raise UserError(
                    f"{missing.origin}: reward.strategy=reference needs a 'reference' response in every "
                    f"prompt row; this one has none"
                )

        def dataset(rows):
            return PromptDataset(
                rows, tokenizer=tokenizer, max_prompt_len=c.data.max_prompt_len, chat_template=c.data.chat_template
            )

        self.dataset = dataset(train_rows)
        heldout = dataset(heldout_rows)
        self.heldout = [heldout.prompt(i) for i in range(len(heldout))]
        self.heldout_rows = [
            {"prompt": p.query, **({"reference": p.reference} if p.reference is not None else {})} for p in self.heldout
        ]
        self.batches = iter(preference_batches(self.dataset, batch_size=c.rollout.prompts_per_step, seed=c.seed))
        if not Path(c.reward.judge).exists():
            raise UserError(
                f"reward.judge={c.reward.judge}: no such folder (an RRM: HF folder, rrm-jax checkpoint or "
                f"run folder of `rrm-jax train`)"
            )
        check_judge_mesh(plan.judge_shape(c), policy_shape, c.with_mesh_for(jax.device_count()).mesh.tp)
        judge_model, judge_tokenizer = load_judge(c.reward.judge, mesh, dtype=c.reward.dtype)
        self.judge = JudgeReward(c.reward, judge_model, judge_tokenizer, G)
        self.toy = c.data.source == "toy"

    @staticmethod
    def _rows(c: TrainConfig):
        if c.data.source == "toy":
            return toy.policy_rows(c.data.train_size, c.seed), toy.policy_rows(
                int(c.data.heldout), c.seed, split="heldout"
            )
        rows = read_prompts(c.data.source, dataset_config=c.data.dataset_config, dataset_split=c.data.dataset_split)
        count_or_fraction = int(c.data.heldout) if c.data.heldout >= 1 else c.data.heldout
        train, heldout = split_heldout(rows, count_or_fraction, seed=c.seed)
        return train, heldout

    # -- the stages the trainer calls --

    def next_batch(self) -> tuple[list[list[int]], list[PolicyPrompt]]:
        """(prompt ids, prompts) of the whole step. Processes exchange only row indices: every process
        holds the dataset and looks the global batch up."""
        local = next(self.batches)
        indices = np.array([p.index for p in local], np.int32)
        if jax.process_count() > 1:
            indices = distributed.gather_processes(indices).reshape(-1)
            local = [self.dataset.prompt(int(i)) for i in indices]
        return [p.prompt_ids for p in local], local

    def score(self, samples, prompts: list[PolicyPrompt], *, seed: int) -> tuple[np.ndarray, dict]:
        """(advantages [R], metrics) of one step's samples (prompt-major, G per prompt)."""
        c, G = self.c, self.c.rollout.samples_per_prompt
        responses = [response_text(s.text, strip_think=c.reward.strip_think) for s in samples]
        groups = [responses[g * G : (g + 1) * G] for g in range(len(prompts))]
        rewards, judging = self.judge.rewards(
            [p.query for p in prompts], groups, [p.reference for p in prompts], seed=seed
        )
        advantages = guard.penalised_advantages(
            np.asarray(grpo.group_advantages(rewards, G, normalize_std=c.loss.normalize_std)),
            np.zeros(len(samples)),
            truncated(samples),
            format_penalty=0.0,
            truncation_penalty=c.guard.truncation_penalty,
        )
        stats = {
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            **judging,
            **rollout_stats(samples, rewards, G),
        }
        if self.toy:
            stats["banned_rate"] = float(
                np.mean([toy.banned_letter(prompts[k // G].query) in r for k, r in enumerate(responses)])
            )
        return advantages, stats

    def evaluate(self, model) -> dict:
        c = self.c
        outs = generate.sample(
            model,
            [p.prompt_ids for p in self.heldout],
            max_new_tokens=c.rollout.max_new_tokens,
            temperature=EVAL_TEMPERATURE,
            top_p=1.0,
            seed=EVAL_SEED,
            eos_ids=None if c.rollout.stop_at_eos else [],
            tokenizer=self.tokenizer,
            allowed_token_ids=self.allowed_ids,
            kv_pool_gb=c.rollout.kv_pool_gb,
        )
        responses = [response_text(o.text, strip_think=c.reward.strip_think) for o in outs]
        row = {"heldout_response_len": float(np.mean([len(o.output_ids) for o in outs]))}
        if self.toy:
            row[CURVE_KEY] = float(np.mean([toy.banned_letter(p.query) in r for p, r in zip(self.heldout, responses)]))
            # the answers the task asks for: lowercase letters only (the judge never saw anything else)
            row["heldout_letter_answers"] = float(
                np.mean([r.isascii() and r.isalpha() and r.islower() for r in responses])
            )
        if all(p.reference is not None for p in self.heldout):
            wins, _ = self.judge.rewards(
                [p.query for p in self.heldout],
                [[r] for r in responses],
                [p.reference for p in self.heldout],
                seed=EVAL_SEED,
                strategy="reference",
            )
            row["heldout_reference_win_rate"] = float(np.mean((wins + 1) / 2))
        return row

    @staticmethod
    def step_progress(row: dict) -> dict:
        """The progress bar's figures of a training step. Not reward_mean: a round robin's or knockout's
        win rates average 0.5 by construction; their spread says how clearly the judge tells the samples apart."""
        figures = {"spread": f"{row['reward_std']:.2f}"}
        if "banned_rate" in row:
            figures["banned"] = f"{row['banned_rate']:.2f}"
        return figures

    @staticmethod
    def eval_progress(row: dict) -> dict:
        """The progress bar's figures of an evaluation row ({} for a row without one)."""
        for key, name in ((CURVE_KEY, "heldout_banned"), ("heldout_reference_win_rate", "heldout_win")):
            if key in row:
                return {name: f"{row[key]:.3f}"}
        return {}

    def warmup_batch(self, batch_size: int, rng: np.random.Generator) -> dict:
        return toy.policy_warmup_batch(self.tokenizer, batch_size, rng)

    def write_heldout(self, path: Path) -> None:
        storage.write_text(path, "".join(json.dumps(r) + "\n" for r in self.heldout_rows))

    def summary(self, rows: list[dict], output_dir: Path, step_dir: Path, exe: str, context: int) -> list[str]:
        evals = [r for r in rows if CURVE_KEY in r or "heldout_response_len" in r]
        lines = []
        if evals and CURVE_KEY in evals[0]:
            first, last = evals[0], evals[-1]
            lines.append(
                f"held-out banned-letter rate ({len(self.heldout)} samples at temperature 1, never trained on): "
                f"{first[CURVE_KEY]:.3f} at step {first['step']} -> {last[CURVE_KEY]:.3f} at step {last['step']}"
            )
            reached = next((r for r in evals if r[CURVE_KEY] <= 0.02), None)
            if reached:
                lines.append(f"first <= 0.02 at step {reached['step']}, {reached['elapsed']:.0f} s after start")
        lines.append(
            f"checkpoint: {step_dir}  (metrics: {output_dir / 'metrics.jsonl'}, curve: {output_dir / 'curve.png'})"
        )
        first = self.heldout[0]
        row = json.dumps({"input_ids": first.prompt_ids, "query": first.query})
        lines.append(
            f"try it (8 answers to the held-out prompt {first.query!r}, its token ids as the policy saw them):"
        )
        lines.append(
            f"  echo {shlex.quote(row)} > {output_dir / 'try.jsonl'} && {exe} generate --model {output_dir} "
            f"--input {output_dir / 'try.jsonl'} --output {output_dir / 'try-out.jsonl'} --temperature 1 "
            f"--num-samples 8 --max-new-tokens {self.c.rollout.max_new_tokens}"
        )
        return lines

    def plot(self, rows: list[dict], ax) -> None:
        train = [r for r in rows if "reward_mean" in r and "banned_rate" in r]
        evals = [r for r in rows if CURVE_KEY in r]
        if train:
            ax.plot(
                [r["step"] for r in train], [r["banned_rate"] for r in train], label="rollout banned rate", alpha=0.5
            )
        ax.plot([r["step"] for r in evals], [r[CURVE_KEY] for r in evals], "o-", label="held-out banned rate (T=1)")
        ax.axhline(0.02, color="gray", ls="--", lw=0.8)
        ax.set_xlabel("GRPO step")
        ax.set_ylabel("fraction of outputs with the banned letter")
        ax.set_ylim(0, 1)
        ax.legend(loc="upper right")
