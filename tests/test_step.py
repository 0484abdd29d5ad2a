"""GRPO update pieces: grouped continuation log-probabilities and micro-batch invariance of the step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rrm_jax import generate
from rrm_jax.model import qwen2
from rrm_jax.model.config import preset
from rrm_jax.model.qwen2 import Qwen2
from rrm_jax.rl import step
from rrm_jax.rl.config import LossConfig


def grouped_batch(rng, P=4, G=3, Tp=12, Tc=6, vocab=100):
    prompts = [rng.integers(3, vocab, n).tolist() for n in rng.integers(2, Tp + 1, P)]
    conts = [rng.integers(3, vocab, n).tolist() for n in rng.integers(1, Tc + 1, P * G)]
    prompt_tokens = np.zeros((P, Tp), np.int32)
    for i, p in enumerate(prompts):
        prompt_tokens[i, : len(p)] = p
    tokens = np.zeros((P * G, Tc), np.int32)
    mask = np.zeros((P * G, Tc), np.float32)
    for r, x in enumerate(conts):
        tokens[r, : len(x)], mask[r, : len(x)] = x, 1.0
    return prompts, conts, prompt_tokens, np.array([len(p) for p in prompts], np.int32), tokens, mask


def test_continuation_logprobs_equal_a_full_forward_over_each_sequence():
    config = preset("tiny")
    params = Qwen2(config, rngs=nnx.Rngs(0)).params()
    prompts, conts, prompt_tokens, lengths, tokens, _ = grouped_batch(np.random.default_rng(0))
    G = len(conts) // len(prompts)
    got = np.asarray(step.logprobs_fn(config, params, prompt_tokens, lengths, tokens))
    for r, x in enumerate(conts):
        seq = prompts[r // G] + x
        full = step.token_logprobs(config, params, jnp.asarray([seq]), jnp.ones((1, len(seq)), jnp.int32))
        np.testing.assert_allclose(got[r, : len(x)], np.asarray(full)[0, len(prompts[r // G]) :], atol=1e-5)


def test_one_or_four_micro_batches_give_the_same_update():
    config = preset("tiny")
    params = Qwen2(config, rngs=nnx.Rngs(1)).params()
    rng = np.random.default_rng(1)
    _, _, prompt_tokens, lengths, tokens, mask = grouped_batch(rng, P=8, G=2)
    old = step.logprobs_fn(config, params, prompt_tokens, lengths, tokens)
    old = old + jnp.asarray(rng.normal(0, 0.2, old.shape), jnp.float32)  # some ratios clip
    batch = step.RolloutBatch(
        prompt_tokens, lengths, tokens, mask, old, old - 0.1, jnp.asarray(rng.normal(size=16), jnp.float32), mask
    )
    optimizer = optax.sgd(0.5)  # the update is the gradient itself
    loss = step.LossSettings(kl_coef=0.05, entropy_coef=0.1, agg="seq-mean-token-mean")
    results = []
    for micro in (1, 4):
        p = jax.tree.map(jnp.copy, params)
        new, _, metrics = step.update_fn(config, loss, optimizer, micro, p, optimizer.init(p), batch)
        results.append((jax.device_get(new), jax.device_get(metrics)))
    (a, ma), (b, mb) = results
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=1e-6)
    assert ma["clip_fraction"] > 0
    for key in ma:
        np.testing.assert_allclose(ma[key], mb[key], atol=1e-6, rtol=1e-6, err_msg=key)


def test_allowed_tokens_loss_sees_the_distribution_the_sampler_drew_from():
    """With a constrained vocabulary, the loss's log-probs equal the rollout's (so the first PPO ratio is
    1), its entropy is the renormalised distribution's, and the update stays finite despite the -inf."""
    config = preset("tiny")
    model = Qwen2(config, rngs=nnx.Rngs(2))
    params = model.params()
    allowed = (4, 9, 16, 25, 36, 49)
    prompts, G, Tc = [[5, 6, 7], [11, 12, 13, 14, 15]], 3, 6
    samples = generate.sample(
        model, prompts, max_new_tokens=Tc, temperature=1.0, num_samples=G, seed=1, eos_ids=[], allowed_token_ids=allowed
    )
    prompt_tokens = np.zeros((len(prompts), 5), np.int32)
    for i, p in enumerate(prompts):
        prompt_tokens[i, : len(p)] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    tokens = np.array([s.output_ids for s in samples], np.int32)
    assert set(tokens.ravel()) <= set(allowed)
    logp, entropy = step.logprobs_fn(
        config, params, prompt_tokens, lengths, tokens, allowed_token_ids=allowed, with_entropy=True
    )
    np.testing.assert_allclose(np.asarray(logp), [s.logprobs for s in samples], atol=1e-5)
    for r, s in enumerate(samples):  # entropy by hand from a full forward, renormalised over `allowed`
        seq = prompts[r // G] + s.output_ids
        z = np.asarray(qwen2.forward(config, params, jnp.asarray([seq]))[0], np.float64)[len(prompts[r // G]) - 1 : -1]
        p = np.exp(z[:, allowed] - z[:, allowed].max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        np.testing.assert_allclose(np.asarray(entropy)[r], -(p * np.log(p)).sum(-1), atol=1e-4)
    mask = np.ones(tokens.shape, np.float32)
    batch = step.RolloutBatch(
        jnp.asarray(prompt_tokens),
        jnp.asarray(lengths),
        jnp.asarray(tokens),
        mask,
        logp,
        logp,
        jnp.asarray([1.0, -1.0, 0.5, -0.5, 0.2, -0.2]),
        mask,
    )
    loss = step.LossSettings(kl_coef=0.05, entropy_coef=0.1, allowed_token_ids=allowed)
    new, _, metrics = step.update_fn(config, loss, optax.sgd(0.1), 1, params, optax.sgd(0.1).init(params), batch)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(new))
    assert np.isfinite(float(metrics["loss"]))


def test_loss_settings_are_the_config_loss_section_plus_token_sets():
    """LossSettings takes its keys and defaults from config.LossConfig, and a run's settings built from
    its config section give the update the old field-by-field settings gave, to the bit."""
    assert step.LossSettings() == step.LossSettings.from_config(LossConfig())
    # the defaults the GRPO update has always had (a LossSettings with no arguments: bench, tests)
    shared = {
        "clip_low": 0.2,
        "clip_high": 0.2,
        "kl_coef": 0.0,
        "kl_estimator": "k3",
        "agg": "token-mean",
        "entropy_coef": 0.0,
        "remat": False,
    }
    assert {k: getattr(step.LossSettings(), k) for k in shared} == shared
    section = LossConfig(
        clip_low=0.1,
        clip_high=0.3,
        kl_coef=0.05,
        kl_estimator="k1",
        agg="seq-mean-token-sum",
        normalize_std=False,
        entropy_coef=0.1,
        entropy_on="verdict",
        ppo_epochs=2,
        micro_batches=2,
        remat=True,
    )
    loss = step.LossSettings.from_config(section, entropy_token_ids=[7, 5], allowed_token_ids=(3, 5, 7, 9))
    assert {k: getattr(loss, k) for k in shared} == {k: getattr(section, k) for k in shared}
    assert (loss.entropy_token_ids, loss.allowed_token_ids) == ((7, 5), (3, 5, 7, 9))
    hash(loss)  # a static argument of the jitted update

    config = preset("tiny")
    params = Qwen2(config, rngs=nnx.Rngs(2)).params()
    rng = np.random.default_rng(2)
    _, _, prompt_tokens, lengths, tokens, mask = grouped_batch(rng, P=4, G=2)
    old = step.logprobs_fn(config, params, prompt_tokens, lengths, tokens)
    old = old + jnp.asarray(rng.normal(0, 0.2, old.shape), jnp.float32)
    batch = step.RolloutBatch(
        prompt_tokens, lengths, tokens, mask, old, old - 0.1, jnp.asarray(rng.normal(size=8), jnp.float32), mask
    )
    optimizer = optax.sgd(0.5)
    section = dataclasses.replace(section, remat=False, kl_estimator="k3")
    field_by_field = step.LossSettings(
        clip_low=section.clip_low,
        clip_high=section.clip_high,
        kl_coef=section.kl_coef,
        kl_estimator=section.kl_estimator,
        agg=section.agg,
        entropy_coef=section.entropy_coef,
        entropy_token_ids=(5, 7),
        remat=section.remat,
    )
    results = []
    for settings in (field_by_field, step.LossSettings.from_config(section, entropy_token_ids=(5, 7))):
        p = jax.tree.map(jnp.copy, params)
        new, _, metrics = step.update_fn(config, settings, optimizer, 2, p, optimizer.init(p), batch)
        results.append(jax.device_get((new, metrics)))
    for x, y in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_array_equal(x, y)
