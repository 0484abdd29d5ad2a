"""The trainer's defences: the format signal's gradient, collapse detection (stop / rollback), truncation warning."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from test_step import grouped_batch
from test_trainer import TINY

from rrm_jax.model.config import preset
from rrm_jax.model.qwen2 import Qwen2
from rrm_jax.rl import grpo, guard, step, trainer
from rrm_jax.rl.config import load_config
from rrm_jax.rl.reward import compute_rewards


def test_penalised_advantages_by_hand():
    # one group of 4: right, wrong, unparseable, unparseable and truncated
    rewards = np.array([1.0, -1.0, -1.0, -1.0])
    adv = np.asarray(grpo.group_advantages(rewards, 4))
    np.testing.assert_allclose(adv, [1.5, -0.5, -0.5, -0.5], atol=1e-5)  # mean -0.5, unbiased std 1
    got = guard.penalised_advantages(adv, [0, 0, 1, 1], [0, 0, 0, 1], format_penalty=0.5, truncation_penalty=0.25)
    np.testing.assert_allclose(got, [1.5, -0.5, -1.0, -1.25], atol=1e-5)


def test_format_signal_gives_a_gradient_when_every_sample_is_unparseable():
    config = preset("tiny")
    params = Qwen2(config, rngs=nnx.Rngs(0)).params()
    _, _, prompt_tokens, lengths, tokens, mask = grouped_batch(np.random.default_rng(0), P=4, G=3)
    R = tokens.shape[0]
    rewards = compute_rewards(["no verdict here"] * R, [1] * R)  # every sample unparseable: all -1
    plain = np.asarray(grpo.group_advantages(rewards, 3))
    assert np.all(plain == 0)  # equal rewards in every group: GRPO alone has nothing to push with
    unparseable = np.ones(R)
    old = step.logprobs_fn(config, params, prompt_tokens, lengths, tokens)
    optimizer = optax.sgd(1.0)
    results = {}
    for penalty in (0.0, 0.5):
        adv = guard.penalised_advantages(
            plain, unparseable, np.zeros(R), format_penalty=penalty, truncation_penalty=0.0
        )
        batch = step.RolloutBatch(prompt_tokens, lengths, tokens, mask, old, old, jnp.asarray(adv), mask)
        p = jax.tree.map(jnp.copy, params)
        new, _, metrics = step.update_fn(config, step.LossSettings(), optimizer, 1, p, optimizer.init(p), batch)
        results[penalty] = (jax.device_get(new), float(metrics["grad_norm"]))
    assert results[0.0][1] == 0.0
    assert results[0.5][1] > 1e-3
    # the step lowers the probability of the unparseable samples it saw
    before = float((old * mask).sum())
    after = float((step.logprobs_fn(config, results[0.5][0], prompt_tokens, lengths, tokens) * mask).sum())
    assert after < before


def test_detector_streaks_and_solved_batches():
    d = guard.CollapseDetector(steps=3)
    healthy = {"unparseable": 0.1, "zero_variance_groups": 0.5, "accuracy": 0.6}
    stuck = {"unparseable": 0.0, "zero_variance_groups": 1.0, "accuracy": 0.5}  # e.g. the verdict stuck on one position
    solved = {"unparseable": 0.0, "zero_variance_groups": 1.0, "accuracy": 1.0}  # every sample right: not a collapse
    assert d.observe(1, stuck) is None and d.observe(2, healthy) is None and d.streak_start is None
    assert d.observe(3, solved) is None and d.streak_start is None
    assert d.observe(4, stuck) is None and d.observe(5, stuck) is None
    c = d.observe(6, stuck)
    assert (c.signal, c.since, c.step) == ("zero_variance_groups", 4, 6)
    assert "collapse at step 6" in c.describe() and "since step 4" in c.describe()
    w = guard.TruncationWatch(0.5, max_new_tokens=6)
    assert w.observe(1, 0.4) is None
    assert "step 2" in w.observe(2, 0.6) and w.observe(3, 0.7) is None  # once per level
    assert "100%" in w.observe(4, 1.0)


def _collapsing_rollout(monkeypatch, first_bad: int, only_first_attempt: bool):
    """From step first_bad on, every sample's text is unparseable (a forced collapse)."""
    real = trainer.rollout

    def rollout(run, state, prompts):
        samples = real(run, state, prompts)
        if state.step >= first_bad and not (only_first_attempt and state.rollbacks):
            return [dataclasses.replace(s, text="no verdict") for s in samples]
        return samples

    monkeypatch.setattr(trainer, "rollout", rollout)


def _rows(out):
    return [json.loads(line) for line in (out / trainer.METRICS).read_text().splitlines()]


def _steps_saved(out):
    return sorted(int(p.name) for p in (out / trainer.CHECKPOINTS).iterdir() if p.name.isdigit())


SETTINGS = TINY + ["eval_every=0", "checkpoint_every=2", "guard.collapse_steps=3"]


def test_collapse_stops_with_one_line_naming_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    _collapsing_rollout(monkeypatch, first_bad=4, only_first_attempt=False)
    out = tmp_path / "run"
    config = load_config(None, SETTINGS + ["max_steps=10", "guard.on_collapse=stop"])
    assert trainer.train(config, out, progress=False) == trainer.EXIT_COLLAPSE
    err = [line for line in capsys.readouterr().err.splitlines() if "collapse" in line]
    assert len(err) == 1
    assert (
        "collapse at step 6" in err[0] and "unparseable" in err[0] and f"{out / 'checkpoints' / '2'} (step 2)" in err[0]
    )
    assert _steps_saved(out) == [2]  # the save due at step 4 waited for a healthy step that never came
    rows = _rows(out)
    assert [r["collapse_streak"] for r in rows if "reward_mean" in r] == [0, 0, 0, 1, 2, 3]
    event = rows[-1]
    assert (event["step"], event["collapse"], event["action"], event["last_good_checkpoint"]) == (
        6,
        "unparseable",
        "stop",
        2,
    )


def test_collapse_rolls_back_to_the_last_good_checkpoint_with_a_new_seed(tmp_path, monkeypatch, capsys):
    _collapsing_rollout(monkeypatch, first_bad=4, only_first_attempt=True)
    out = tmp_path / "run"
    config = load_config(None, SETTINGS + ["max_steps=8", "guard.on_collapse=rollback"])
    assert trainer.train(config, out, progress=False) == 0
    assert "rolled back to checkpoint step 2" in capsys.readouterr().err
    rows = _rows(out)
    event = next(r for r in rows if "collapse" in r)
    assert (event["step"], event["action"], event["rolled_back_to"], event["rollbacks"]) == (6, "rollback", 2, 1)
    assert event["rollout_seed"] != config.seed
    after = [r for r in rows[rows.index(event) + 1 :]]
    assert [r["step"] for r in after] == [3, 4, 5, 6, 7, 8] and max(r["unparseable"] for r in after) < 1.0
    assert [r["step"] for r in trainer.current_attempt(rows)] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert _steps_saved(out)[-1] == 8
