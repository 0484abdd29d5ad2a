"""GRPO training (`rrm-jax train`): an RRM judge on preference pairs, or a policy with an RRM as its reward.

config         the training config: one dataclass per YAML section, `key=value` overrides
train_cli      the command's flags (no JAX import, so `--help` is fast)
trainer        the training loop: setup, steps, held-out evaluation, checkpoints, preemption, export
task           the contract both tasks implement (`Task`)
checkpoints    a run's Orbax checkpoints
metrics        metrics.jsonl and TensorBoard
plot           curve.png
judge_task     the task of judge training (`reward.type: rrm`)
policy         the task of policy training (`reward.type: judge`), with judge_reward its reward model
reward         rewards of judge rollouts, by name
strategies     group rewards from a pairwise judge's verdicts
grpo           group advantages, KL estimators, the clipped policy loss (pure functions)
step           the jitted log-probabilities and update of a step
guard          defences of a run against failing silently
rollout_stats  the rollout metrics every task logs
tokenizer      the tokenizer of a training config
"""
