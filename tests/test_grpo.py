"""GRPO loss pieces against hand-computed values and a plain-Python reference written here."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rrm_jax.errors import UserError
from rrm_jax.rl import grpo

AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
ESTIMATORS = ("k1", "k2", "k3")


# ---------- advantages ----------


def test_group_advantages_hand_computed():
    # group [1, -1, -1, -1]: mean -0.5, sample std (ddof=1) = 1; group [1, 1, -1, 3]: mean 1, std sqrt(8/3)
    adv = grpo.group_advantages(jnp.array([1.0, -1, -1, -1, 1, 1, -1, 3]), 4, eps=0.0)
    s = math.sqrt(8 / 3)
    np.testing.assert_allclose(adv, [1.5, -0.5, -0.5, -0.5, 0, 0, -2 / s, 2 / s], rtol=1e-6, atol=1e-7)


def test_group_advantages_eps_and_dr_grpo():
    adv = grpo.group_advantages(jnp.array([2.0, 0.0]), 2, eps=0.5)  # std = sqrt(2)
    np.testing.assert_allclose(adv, [1 / (math.sqrt(2) + 0.5), -1 / (math.sqrt(2) + 0.5)], rtol=1e-6)
    adv = grpo.group_advantages(jnp.array([2.0, 0.0, 5.0, 6.0, 7.0, 6.0]), 3, normalize_std=False)
    np.testing.assert_allclose(adv, [2 - 7 / 3, -7 / 3, 5 - 7 / 3, -1 / 3, 2 / 3, -1 / 3], rtol=1e-6, atol=1e-6)


def test_group_advantages_edge_cases():
    np.testing.assert_array_equal(grpo.group_advantages(jnp.array([1.0, 1, 1, -1, -1, -1]), 3), np.zeros(6))
    np.testing.assert_array_equal(grpo.group_advantages(jnp.array([1.0, -1, 0.5]), 1), np.zeros(3))
    np.testing.assert_array_equal(grpo.group_advantages(jnp.array([1.0, -1, 0.5]), 1, normalize_std=False), np.zeros(3))
    with pytest.raises(ValueError):
        grpo.group_advantages(jnp.ones(6), 4)


# ---------- an independent reference: plain Python loops over tokens ----------


def reference_loss(
    logp,
    old,
    ref,
    adv,
    mask,
    *,
    clip_low,
    clip_high,
    kl_coef,
    estimator,
    agg,
    entropy=None,
    entropy_mask=None,
    entropy_coef=0.0,
):
    def kl(lp, rf):
        if estimator == "k1":
            return lp - rf
        if estimator == "k2":
            return 0.5 * (lp - rf) ** 2
        return min(max(math.exp(rf - lp) - (rf - lp) - 1, -10), 10)

    def per_token(b, t):
        rho = math.exp(logp[b][t] - old[b][t])
        a = adv[b]
        pg = max(-a * rho, -a * min(max(rho, 1 - clip_low), 1 + clip_high))
        return pg + kl_coef * kl(logp[b][t], ref[b][t])

    def aggregate(value, m):
        rows = [[value(b, t) for t in range(len(m[b])) if m[b][t]] for b in range(len(m))]
        rows = [r for r in rows if r]
        if agg == "token-mean":
            flat = [v for r in rows for v in r]
            return sum(flat) / len(flat)
        if agg == "seq-mean-token-mean":
            return sum(sum(r) / len(r) for r in rows) / len(rows)
        return sum(sum(r) for r in rows) / len(rows)

    loss = aggregate(per_token, mask)
    if entropy is not None:
        loss -= entropy_coef * aggregate(lambda b, t: entropy[b][t], entropy_mask)
    return loss


def random_batch(seed, B=4, T=6):
    rng = np.random.default_rng(seed)
    logp = np.log(rng.uniform(0.05, 0.95, (B, T)))
    old = logp + rng.normal(0, 0.3, (B, T))  # ratios well inside and outside [0.8, 1.2]
    ref = logp + rng.normal(0, 0.5, (B, T))
    adv = rng.normal(0, 1, B)
    mask = np.ones((B, T))
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("clip", [(0.2, 0.2), (0.2, 0.28), (0.05, 0.1)])
def test_policy_loss_matches_reference(agg, estimator, clip):
    logp, old, ref, adv, mask = random_batch(0)
    got, metrics = grpo.policy_loss(
        jnp.array(logp),
        jnp.array(old),
        jnp.array(ref),
        jnp.array(adv),
        jnp.array(mask),
        clip_low=clip[0],
        clip_high=clip[1],
        kl_coef=0.3,
        kl_estimator=estimator,
        agg=agg,
    )
    want = reference_loss(
        logp.tolist(),
        old.tolist(),
        ref.tolist(),
        adv.tolist(),
        mask.tolist(),
        clip_low=clip[0],
        clip_high=clip[1],
        kl_coef=0.3,
        estimator=estimator,
        agg=agg,
    )
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5, atol=1e-6)


def test_policy_loss_literal_values():
    # one row, two tokens; old logp 0, so rho = exp(logp): rho = [1.5, 0.5], A = +1, clip 0.2
    logp = jnp.log(jnp.array([[1.5, 0.5]]))
    zeros = jnp.zeros((1, 2))
    loss, m = grpo.policy_loss(logp, zeros, zeros, jnp.array([1.0]), jnp.ones((1, 2)))
    # token 1: max(-1.5, -1.2) = -1.2 (clipped); token 2: max(-0.5, -0.8) = -0.5 -> mean -0.85
    np.testing.assert_allclose(float(loss), -0.85, rtol=1e-6)
    np.testing.assert_allclose(float(m["clip_fraction"]), 0.5)
    np.testing.assert_allclose(
        [float(m["ratio_mean"]), float(m["ratio_min"]), float(m["ratio_max"])], [1.0, 0.5, 1.5], rtol=1e-6
    )
    # negative advantage: token 1 max(1.5, 1.2) = 1.5, token 2 max(0.5, 0.8) = 0.8 (clipped) -> 1.15
    loss, m = grpo.policy_loss(logp, zeros, zeros, jnp.array([-1.0]), jnp.ones((1, 2)))
    np.testing.assert_allclose(float(loss), 1.15, rtol=1e-6)
    np.testing.assert_allclose(float(m["clip_fraction"]), 0.5)
    # asymmetric clip (clip_high 0.6): token 1 no longer clipped -> (-1.5 - 0.5) / 2
    loss, m = grpo.policy_loss(logp, zeros, zeros, jnp.array([1.0]), jnp.ones((1, 2)), clip_high=0.6)
    np.testing.assert_allclose(float(loss), -1.0, rtol=1e-6)
    np.testing.assert_allclose(float(m["clip_fraction"]), 0.0)


def test_kl_estimators_literal_values():
    logp, ref = jnp.array([[-1.0]]), jnp.array([[-2.0]])  # logp - ref = 1
    np.testing.assert_allclose(grpo.kl_penalty(logp, ref, "k1"), [[1.0]])
    np.testing.assert_allclose(grpo.kl_penalty(logp, ref, "k2"), [[0.5]])
    np.testing.assert_allclose(grpo.kl_penalty(logp, ref, "k3"), [[math.exp(-1) + 1 - 1]], rtol=1e-6)
    # k3 is clamped at 10: logp - ref = -20 would give e^20 - 21
    np.testing.assert_allclose(grpo.kl_penalty(jnp.array([[-21.0]]), jnp.array([[-1.0]]), "k3"), [[10.0]])
    # on-policy with zero advantage, the loss is kl_coef * KL alone and metrics report that KL
    loss, m = grpo.policy_loss(logp, logp, ref, jnp.zeros(1), jnp.ones((1, 1)), kl_coef=0.1, kl_estimator="k2")
    np.testing.assert_allclose([float(loss), float(m["kl"])], [0.05, 0.5], rtol=1e-6)


def test_fully_masked_row_counts_for_nothing():
    logp, old, ref, adv, mask = random_batch(1)
    mask[1] = 0
    logp[1], old[1] = -np.inf, np.nan  # garbage under the mask must not leak
    for agg in AGGS:
        got, metrics = grpo.policy_loss(*map(jnp.array, (logp, old, ref, adv, mask)), kl_coef=0.1, agg=agg)
        keep = [0, 2, 3]
        want, _ = grpo.policy_loss(*(jnp.array(x[keep]) for x in (logp, old, ref, adv, mask)), kl_coef=0.1, agg=agg)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
        assert all(np.isfinite(float(v)) for v in metrics.values())
        grads = jax.grad(lambda lp, agg=agg: grpo.policy_loss(lp, *map(jnp.array, (old, ref, adv, mask)), agg=agg)[0])(
            jnp.array(logp)
        )
        assert np.all(np.isfinite(grads)) and np.all(grads[1] == 0)


def test_all_masked_batch_is_zero_loss():
    z = jnp.zeros((2, 3))
    loss, m = grpo.policy_loss(z, z, z, jnp.ones(2), z)
    assert float(loss) == 0.0 and float(m["clip_fraction"]) == 0.0 and np.isnan(float(m["ratio_mean"]))


def test_entropy_bonus_on_verdict_position():
    logp, old, ref, adv, mask = random_batch(2)
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, (4, 6, 9))
    verdict_ids = [4, 7]
    pair = logits[..., verdict_ids]
    p = np.exp(pair) / np.exp(pair).sum(-1, keepdims=True)
    entropy = -(p * np.log(p)).sum(-1)
    np.testing.assert_allclose(grpo.restricted_entropy(jnp.array(logits), verdict_ids), entropy, rtol=1e-5)
    full = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(grpo.token_entropy(jnp.array(logits)), -(full * np.log(full)).sum(-1), rtol=1e-5)

    verdict_mask = np.zeros_like(mask)
    verdict_mask[[0, 1, 3], [2, 5, 0]] = 1
    for agg in AGGS:
        got, m = grpo.policy_loss(
            *map(jnp.array, (logp, old, ref, adv, mask)),
            agg=agg,
            entropy=jnp.array(entropy),
            entropy_mask=jnp.array(verdict_mask),
            entropy_coef=0.1,
        )
        want = reference_loss(
            logp.tolist(),
            old.tolist(),
            ref.tolist(),
            adv.tolist(),
            mask.tolist(),
            clip_low=0.2,
            clip_high=0.2,
            kl_coef=0.0,
            estimator="k3",
            agg=agg,
            entropy=entropy.tolist(),
            entropy_mask=verdict_mask.tolist(),
            entropy_coef=0.1,
        )
        np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)
    # one verdict token per row: every aggregation gives the plain mean of the three entropies
    np.testing.assert_allclose(float(m["entropy"]), entropy[[0, 1, 3], [2, 5, 0]].mean(), rtol=1e-5)


@pytest.mark.parametrize("agg", AGGS)
def test_micro_batches_reproduce_full_batch(agg):
    B, T = 16, 12
    rng = np.random.default_rng(4)
    logp = jnp.array(np.log(rng.uniform(0.05, 0.95, (B, T))))
    old = logp + rng.normal(0, 0.3, (B, T))
    ref = logp + rng.normal(0, 0.3, (B, T))
    adv = jnp.array(rng.normal(0, 1, B))
    lengths = rng.integers(0, T + 1, B)
    lengths[5] = 0  # an empty row inside one micro-batch
    mask = jnp.array((np.arange(T)[None] < lengths[:, None]).astype(np.float32))
    entropy = jnp.array(rng.uniform(0, 0.7, (B, T)))
    opts = dict(agg=agg, kl_estimator="k3")
    coefs = dict(kl_coef=0.05, entropy_coef=0.1)

    def terms(lp, rows):
        return grpo.policy_loss_terms(
            lp[rows], old[rows], ref[rows], adv[rows], mask[rows], entropy=entropy[rows], **opts
        )

    full_loss, full_metrics = grpo.finalize_terms(terms(logp, slice(None)), **coefs)
    parts = [slice(i, i + 4) for i in range(0, B, 4)]
    merged = terms(logp, parts[0])
    for rows in parts[1:]:
        merged = grpo.merge_terms(merged, terms(logp, rows))
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(terms(logp, rows) for rows in parts))
    for combined in (merged, grpo.merge_stacked_terms(stacked)):
        loss, metrics = grpo.finalize_terms(combined, **coefs)
        np.testing.assert_allclose(float(loss), float(full_loss), rtol=1e-6, atol=1e-6)
        for k in full_metrics:
            np.testing.assert_allclose(float(metrics[k]), float(full_metrics[k]), rtol=1e-6, atol=1e-6)

    # gradient accumulation: per-micro-batch objectives with the global counts
    count = grpo.aggregation_count(mask, agg)
    entropy_count = grpo.aggregation_count(mask, agg)

    def micro(lp, rows):
        return grpo.micro_batch_objective(terms(lp, rows), count=count, entropy_count=entropy_count, **coefs)

    full_grad = jax.grad(lambda lp: grpo.finalize_terms(terms(lp, slice(None)), **coefs)[0])(logp)
    acc_loss = sum(float(micro(logp, rows)) for rows in parts)
    acc_grad = sum(jax.grad(micro)(logp, rows) for rows in parts)
    np.testing.assert_allclose(acc_loss, float(full_loss), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(acc_grad, full_grad, rtol=1e-6, atol=1e-6)


def test_aggregation_count():
    mask = jnp.array([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    assert float(grpo.aggregation_count(mask, "token-mean")) == 3
    assert float(grpo.aggregation_count(mask, "seq-mean-token-mean")) == 2
    assert float(grpo.aggregation_count(mask, "seq-mean-token-sum")) == 2


def test_jit_and_bad_names():
    logp, old, ref, adv, mask = map(jnp.array, random_batch(5))
    jitted = jax.jit(grpo.policy_loss, static_argnames=("agg", "kl_estimator"))
    np.testing.assert_allclose(
        jitted(logp, old, ref, adv, mask, agg="seq-mean-token-sum")[0],
        grpo.policy_loss(logp, old, ref, adv, mask, agg="seq-mean-token-sum")[0],
        rtol=1e-6,
    )
    with pytest.raises(UserError, match="agg='sum'.*token-mean"):
        grpo.policy_loss(logp, old, ref, adv, mask, agg="sum")
    with pytest.raises(UserError, match="kl_estimator='k4'"):
        grpo.policy_loss(logp, old, ref, adv, mask, kl_estimator="k4")
    with pytest.raises(ValueError, match="ref_logp"):
        grpo.policy_loss(logp, old, None, adv, mask, kl_coef=0.1)


# ---------- reward ----------


def test_rrm_reward_on_real_verdict_strings():
    from rrm_jax.rl import reward

    texts = [
        "The query asks for 2+2. Assistant 1 says 4, which is right.\n</think>\n\n\\boxed{Assistant 1}",  # picks 1
        "Both are fluent but response 2 follows the instruction.\n</think>\n\\boxed{Assistant 2}<｜end▁of▁sentence｜>",  # picks 2
        "</think>\\boxed{Assistant 2}",  # the toy judge's answer
        "maybe \\boxed{Assistant 1} here\n</think>\nI cannot decide.",  # boxed only inside the thinking part
        "Still thinking about \\boxed{Assistant 1}",  # never closed </think>
        "</think>\\boxed{ Assistant 1 }",  # extra spaces
        "</think>\\boxed{Assistant 3}",
    ]
    preferred = [1, 1, 2, 1, 1, 1, 1]
    np.testing.assert_array_equal(reward.compute_rewards(texts, preferred), [1, -1, 1, -1, -1, -1, -1])
    np.testing.assert_array_equal(reward.compute_rewards(texts[:3], [2, 2, 1]), [-1, 1, -1])
    assert reward.compute_rewards(texts, preferred).dtype == np.float32


def test_rewards_are_pluggable_by_name():
    from rrm_jax.rl import reward

    @reward.register_reward("test-length")
    def length_reward(text, preferred):
        return float(len(text))

    try:
        np.testing.assert_array_equal(reward.compute_rewards(["ab", "abc"], [1, 2], reward="test-length"), [2, 3])
        with pytest.raises(ValueError, match="already registered"):
            reward.register_reward("test-length")(length_reward)
    finally:
        del reward.REWARDS["test-length"]
    with pytest.raises(UserError, match="unknown reward 'nope'; available: rrm"):
        reward.get_reward("nope")
