"""The jitted pieces of a GRPO step after the rollout: continuation log-probabilities and the update.

A rollout batch is grouped as the sampler made it: right-padded prompts `prompt_tokens [P, Tp]` with
`prompt_lengths [P]`, and their G = R // P continuations each, prompt-major, `tokens [R, Tc]` with a
`loss_mask [R, Tc]` that is 1 on generated tokens. Each prompt is encoded once per group, as in the
sampler (`qwen2.grouped_hidden_states`). Log-probabilities are aligned with the continuation tokens:
`logp[r, t] = log p(tokens[r, t] | prompt, tokens[r, :t])`.

The update accumulates gradients over micro-batches (whole groups) with `lax.scan`, each micro-batch's
loss scaled by the FULL batch's counts (see rl/grpo.py), so the step equals the full-batch step exactly.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from rrm_jax.model import qwen2
from rrm_jax.model.config import Qwen2Config
from rrm_jax.rl import grpo
from rrm_jax.rl.config import LossConfig
from rrm_jax.sampling import restrict_logits


@dataclasses.dataclass(frozen=True)
class LossSettings(LossConfig):
    """The config's `loss` section (its keys and defaults) plus the token sets a run resolves with its
    tokenizer; a static argument of the jitted update, so hashable."""

    entropy_token_ids: tuple[int, ...] = ()  # entropy over these tokens only (empty: whole vocabulary)
    allowed_token_ids: tuple[int, ...] = ()  # the policy's constrained vocabulary, as its rollout samples it

    @classmethod
    def from_config(
        cls, loss: LossConfig, *, entropy_token_ids: tuple[int, ...] = (), allowed_token_ids: tuple[int, ...] = ()
    ) -> LossSettings:
        section = {f.name: getattr(loss, f.name) for f in dataclasses.fields(LossConfig)}
        return cls(**section, entropy_token_ids=tuple(entropy_token_ids), allowed_token_ids=tuple(allowed_token_ids))


class RolloutBatch(NamedTuple):
    prompt_tokens: jax.Array  # [P, Tp] int32, right-padded
    prompt_lengths: jax.Array  # [P] int32
    tokens: jax.Array  # [R, Tc] int32: the G = R // P continuations of each prompt, prompt-major
    loss_mask: jax.Array  # [R, Tc]: 1 on generated tokens
    old_logp: jax.Array  # [R, Tc]: from the rollout policy
    ref_logp: jax.Array  # [R, Tc]: from the frozen reference (zeros when kl_coef == 0)
    advantages: jax.Array  # [R]
    entropy_mask: jax.Array  # [R, Tc]: where the entropy bonus applies


def _take_logprobs(logits, tokens):
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[..., None], axis=-1)[..., 0]


def _entropy(logits, entropy_token_ids):
    if entropy_token_ids:
        return grpo.restricted_entropy(logits, jnp.asarray(entropy_token_ids, jnp.int32))
    return grpo.token_entropy(logits)


def token_logprobs(config: Qwen2Config, params, tokens, attention_mask, *, remat=False):
    """logp [B, T] of each token of whole sequences given its prefix (0 at t = 0)."""
    logits = qwen2.forward(config, params, tokens, attention_mask=attention_mask, remat=remat)[:, :-1]
    return jnp.pad(_take_logprobs(logits, tokens[:, 1:]), ((0, 0), (1, 0)))


def continuation_logprobs(
    config: Qwen2Config,
    params,
    prompt_tokens,
    prompt_lengths,
    tokens,
    *,
    entropy_token_ids=(),
    allowed_token_ids=(),
    remat=False,
    with_entropy=False,
):
    """logp [R, Tc] of each continuation token (see the module docstring); with_entropy also returns the
    entropy [R, Tc] of each predicted distribution (over entropy_token_ids only, when given).
    allowed_token_ids: the model restricted to that vocabulary, as the sampler restricts it (its
    entropy is then the restricted distribution's)."""
    hidden = qwen2.grouped_hidden_states(config, params, prompt_tokens, prompt_lengths, tokens, remat=remat)
    logits = qwen2.logits_from_hidden(config, params, hidden)
    if allowed_token_ids:
        logits = restrict_logits(logits, allowed_token_ids)
        entropy_token_ids = entropy_token_ids or allowed_token_ids  # the -inf entries would make p log p NaN
    logp = _take_logprobs(logits, tokens)
    return (logp, _entropy(logits, entropy_token_ids)) if with_entropy else logp


def _terms(config: Qwen2Config, loss: LossSettings, params, mb: RolloutBatch) -> grpo.LossTerms:
    use_entropy = loss.entropy_coef > 0
    out = continuation_logprobs(
        config,
        params,
        mb.prompt_tokens,
        mb.prompt_lengths,
        mb.tokens,
        entropy_token_ids=loss.entropy_token_ids,
        allowed_token_ids=loss.allowed_token_ids,
        remat=loss.remat,
        with_entropy=use_entropy,
    )
    logp, entropy = out if use_entropy else (out, None)
    return grpo.policy_loss_terms(
        logp,
        mb.old_logp,
        mb.ref_logp if loss.kl_coef else None,
        mb.advantages,
        mb.loss_mask,
        clip_low=loss.clip_low,
        clip_high=loss.clip_high,
        kl_estimator=loss.kl_estimator,
        agg=loss.agg,
        entropy=entropy,
        entropy_mask=mb.entropy_mask if use_entropy else None,
    )


def _split(batch: RolloutBatch, micro_batches: int) -> RolloutBatch:
    """Micro-batches of whole groups: prompt arrays and continuation arrays split alike (prompt-major)."""
    return jax.tree.map(lambda x: x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:]), batch)


def update(
    config: Qwen2Config,
    loss: LossSettings,
    optimizer: optax.GradientTransformation,
    micro_batches: int,
    params,
    opt_state,
    batch: RolloutBatch,
):
    """One optimizer step on a rollout batch -> (params, opt_state, metrics)."""
    count = grpo.aggregation_count(batch.loss_mask, loss.agg)
    entropy_count = grpo.aggregation_count(batch.entropy_mask, loss.agg) if loss.entropy_coef > 0 else 0.0

    def micro_step(grads, mb):
        def objective(p):
            terms = _terms(config, loss, p, mb)
            value = grpo.micro_batch_objective(
                terms, count=count, entropy_count=entropy_count, kl_coef=loss.kl_coef, entropy_coef=loss.entropy_coef
            )
            return value, terms

        (_, terms), g = jax.value_and_grad(objective, has_aux=True)(params)
        return jax.tree.map(jnp.add, grads, g), terms

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, terms = jax.lax.scan(micro_step, zeros, _split(batch, micro_batches))
    merged = jax.tree.map(lambda x: x.sum(0), terms)._replace(
        ratio_min=terms.ratio_min.min(), ratio_max=terms.ratio_max.max()
    )
    _, metrics = grpo.finalize_terms(merged, kl_coef=loss.kl_coef, entropy_coef=loss.entropy_coef)
    metrics["grad_norm"] = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics


update_fn = jax.jit(update, static_argnums=(0, 1, 2, 3), donate_argnums=(4, 5))
logprobs_fn = jax.jit(
    continuation_logprobs,
    static_argnums=(0,),
    static_argnames=("entropy_token_ids", "allowed_token_ids", "remat", "with_entropy"),
)
