"""One decoding record (rrm_jax.decoding.Decoding) for the judge, its flags, the sampler and the trainer's config."""

import dataclasses

import pytest
from judge_utils import ScriptedGenerate, boxed, build_test_tokenizer

from rrm_jax import cli, sampling
from rrm_jax.decoding import Decoding
from rrm_jax.errors import UserError
from rrm_jax.model.config import preset
from rrm_jax.rl.config import load_config
from rrm_jax.rrm.judge import EVAL_DECODING, Judge


@pytest.mark.parametrize(
    "values, message",
    [
        ({"temperature": -0.5}, "temperature must be >= 0, got -0.5"),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"top_k": -1}, "top_k must be >= 0 (0 = off), got -1"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1, got 0"),
        ({"max_think_tokens": 0}, "max_think_tokens must be >= 1, got 0"),
    ],
)
def test_a_bad_value_is_one_line_naming_it(values, message):
    with pytest.raises(UserError) as e:
        Decoding(**values)
    assert str(e.value) == message


def test_decoding_is_frozen_and_its_options_are_the_sampler_keywords():
    d = Decoding(temperature=0.0, top_k=5, max_think_tokens=16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.temperature = 1.0
    assert d.options() == {"temperature": 0.0, "top_p": 1.0, "top_k": 5, "max_new_tokens": None, "max_think_tokens": 16}
    # the published evaluations' decoding, the judge's default
    assert (
        EVAL_DECODING.temperature,
        EVAL_DECODING.top_p,
        EVAL_DECODING.top_k,
        EVAL_DECODING.max_new_tokens,
        EVAL_DECODING.max_think_tokens,
    ) == (0.6, 1.0, 0, 8192, None)


def test_the_judge_holds_one_decoding_given_whole_or_field_by_field(tmp_path):
    tokenizer = build_test_tokenizer(tmp_path)
    generate = ScriptedGenerate(tokenizer, lambda query, first, second, s: boxed(1))
    whole = Judge(generate, tokenizer, decoding=Decoding(temperature=0.0, max_new_tokens=4))
    by_field = Judge(generate, tokenizer, temperature=0.0, max_new_tokens=4, top_p=1.0, top_k=0)
    assert whole.decoding == by_field.decoding == Decoding(temperature=0.0, max_new_tokens=4)
    assert Judge(generate, tokenizer, max_think_tokens=32).decoding == dataclasses.replace(
        EVAL_DECODING, max_think_tokens=32
    )
    with pytest.raises(UserError, match=r"^top_k must be >= 0 \(0 = off\), got -2$"):
        Judge(generate, tokenizer, decoding=Decoding(), top_k=-2)


@pytest.mark.parametrize(
    "override, message",
    [
        ("reward.top_p=0", "reward.top_p must be in (0, 1], got 0.0"),
        ("reward.temperature=-1", "reward.temperature must be >= 0, got -1.0"),
        ("reward.max_think_tokens=0", "reward.max_think_tokens must be >= 1, got 0"),
        ("reward.max_new_tokens=0", "reward.max_new_tokens must be >= 1, got 0"),
        ("rollout.temperature=-0.5", "rollout.temperature must be >= 0, got -0.5"),
        ("rollout.top_p=2", "rollout.top_p must be in (0, 1], got 2.0"),
        ("rollout.max_new_tokens=0", "rollout.max_new_tokens must be >= 1, got 0"),
    ],
)
def test_the_training_config_checks_its_decoding_naming_the_key(override, message):
    with pytest.raises(UserError) as e:
        load_config(None, [override])
    assert str(e.value) == message


def test_the_sampler_checks_its_settings_with_the_same_messages():
    config = preset("tiny")
    with pytest.raises(UserError, match=r"^top_p must be in \(0, 1\], got 0.0$"):
        sampling.make_settings(
            config,
            temperature=1.0,
            top_p=0.0,
            top_k=0,
            eos_ids=(),
            max_think_tokens=None,
            tokenizer=None,
            think_end_ids_override=None,
        )


def test_a_bad_decoding_flag_is_one_line_before_any_model_load(capsys, monkeypatch):
    from rrm_jax.rrm import judge

    monkeypatch.setattr(judge, "load_backend", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["judge", "--model", "M", "--query", "q", "--response-1", "a", "--response-2", "b", "--top-k", "-3"]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == "rrm-jax: error: top_k must be >= 0 (0 = off), got -3\n"
