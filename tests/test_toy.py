"""The embedded toy task: its character tokenizer, prompt template, generator, warm-up data, files."""

import os
from importlib import resources

import numpy as np
import pytest
import yaml
from transformers import AutoTokenizer

from rrm_jax.data import char_tokenizer, preference, toy
from rrm_jax.rrm import prompt
from rrm_jax.rrm.prompt import parse_verdict


@pytest.fixture(scope="module")
def tokenizer():
    return toy.toy_tokenizer()


def test_characters_round_trip(tokenizer):
    text = "Hello, World! 0-9 ~{}[]\\ \n<think>\\boxed{Assistant 2}</think>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert pieces[:5] == ["H", "e", "l", "l", "o"]
    assert [p for p in pieces if len(p) > 1] == ["<think>", "\\boxed{", "Assistant 2", "</think>"]
    assert tokenizer.decode(tokenizer("naïve", add_special_tokens=False)["input_ids"]) == "na<unk>ve"


def test_special_tokens_and_vocabulary(tokenizer):
    assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id] == [
        0,
        1,
        2,
        3,
    ]
    assert len(tokenizer) == 4 + 96 + 5 + 1  # specials, printable ASCII and newline, marker tokens, "avoid "
    # plain calls add nothing: the chat template writes the BOS token itself
    assert tokenizer("ab")["input_ids"] == tokenizer("ab", add_special_tokens=False)["input_ids"]
    assert char_tokenizer.verdict_token_ids(tokenizer) == (
        tokenizer.convert_tokens_to_ids("Assistant 1"),
        tokenizer.convert_tokens_to_ids("Assistant 2"),
    )
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    without_verdicts = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")), unk_token="<unk>"
    )
    with pytest.raises(ValueError, match="no single verdict tokens"):
        char_tokenizer.verdict_token_ids(without_verdicts)


def test_verdict_is_one_token_and_parses_after_decoding(tokenizer):
    for verdict in (1, 2):
        completion = toy.verdict_completion(tokenizer, verdict)
        ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        assert len(ids) == 5 and ids[-1] == tokenizer.eos_token_id
        assert ids[2] == char_tokenizer.verdict_token_ids(tokenizer)[verdict - 1]
        text = tokenizer.decode(ids, skip_special_tokens=True)  # as the sampler decodes
        assert text == f"</think>\\boxed{{Assistant {verdict}}}"
        assert parse_verdict(text) == verdict


def test_save_and_reload_with_auto_tokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    text = prompt.render(tokenizer, "avoid q", "abcde", "fqhij") + toy.verdict_completion(tokenizer, 2)
    assert loaded(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert loaded.chat_template == tokenizer.chat_template
    assert prompt.render(loaded, "avoid q", "abcde", "fqhij") == "<s>avoid q:abcde|fqhij<think>"
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<s>", "</s>", "<pad>")


def test_chat_template_compresses_the_rrm_prompt(tokenizer):
    rendered = prompt.render(tokenizer, "avoid x", "abcde", "fxhij")
    assert rendered == "<s>avoid x:abcde|fxhij<think>"
    assert len(prompt.encode(tokenizer, rendered)) == 16  # the recipe's layout: "avoid " is one token
    assert toy.render_toy(tokenizer, "avoid x", "abcde", "fxhij") == rendered
    # responses with line breaks and the separators survive unchanged
    odd = ("q\n\n## Query", "a|b:\n\n", "")
    assert prompt.render(tokenizer, *odd) == toy.render_toy(tokenizer, *odd) == "<s>q\n\n## Query:a|b:\n\n|<think>"
    # any other conversation is written as it is; an answer closes with the EOS token
    other = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "</think>\\boxed{Assistant 1}"}]
    assert tokenizer.apply_chat_template(other, tokenize=False) == "<s>hello<think></think>\\boxed{Assistant 1}</s>"
    assert tokenizer.apply_chat_template(other[:1], tokenize=False, add_generation_prompt=True) == "<s>hello<think>"


def test_generated_items_follow_the_rule():
    pairs = toy.make_toy_pairs(2000, seed=3)
    banned = []
    for p in pairs:
        assert p.query.startswith("avoid ") and len(p.query) == 7
        x = p.query[-1]
        banned.append(x)
        assert (
            len(p.chosen) == len(p.rejected) == 5
            and (p.chosen + p.rejected).isalpha()
            and (p.chosen + p.rejected).islower()
        )
        assert x not in p.chosen and p.rejected.count(x) == 1
    choices = "abcdefghijklmnopqrstuvwxyz"[-toy.BANNED_CHOICES :]
    assert set(banned) == set(choices)
    assert toy.BANNED_CHOICES == 26  # the full task
    counts = np.array([banned.count(c) for c in choices])
    expected = 2000 / len(choices)
    assert np.sum((counts - expected) ** 2 / expected) < 52.6  # uniform: chi-square, 25 dof, p = 0.001
    positions = [p.rejected.index(p.query[-1]) for p in pairs]
    assert set(positions) == set(range(5))


def test_generator_is_seeded_and_splits_are_disjoint():
    a = toy.make_toy_pairs(300, seed=0)
    assert toy.make_toy_pairs(300, seed=0) == a
    assert toy.make_toy_pairs(10, seed=0) == a[:10]  # item i does not depend on how many are drawn
    assert toy.make_toy_pairs(300, seed=1) != a
    heldout = toy.make_toy_pairs(300, seed=0, split="heldout")
    key = lambda p: (p.query, p.chosen, p.rejected)  # noqa: E731
    assert not {key(p) for p in a} & {key(p) for p in heldout}


def _verdicts_and_truths(tokenizer, batch):
    tokens, mask = batch["tokens"], batch["loss_mask"]
    assert tokens.shape == (len(tokens), 21) and tokens.dtype == np.int32 and mask.dtype == np.float32
    for row, row_mask in zip(tokens, mask):
        assert row_mask.tolist() == [0.0] * 16 + [1.0] * 5  # only the answer is learnt
        text = tokenizer.decode(row[:16])
        query, responses = text[len("<s>") : -len("<think>")].split(":")
        first, second = responses.split("|")
        yield parse_verdict(tokenizer.decode(row[16:], skip_special_tokens=True)), 1 if query[-1] not in first else 2


def test_format_warmup_batch_has_random_verdicts(tokenizer):
    batch = toy.format_warmup_batch(tokenizer, 400, np.random.default_rng(0))
    agree = verdicts_one = 0
    for verdict, truth in _verdicts_and_truths(tokenizer, batch):
        assert verdict in (1, 2)
        agree += verdict == truth
        verdicts_one += verdict == 1
    # verdicts are coin flips, independent of the truth: the model learns the format, not the task
    assert 160 < agree < 240 and 160 < verdicts_one < 240
    # the diagnostic mode (benchmarks/toy_init.py) writes the right verdict on the same items
    true = toy.format_warmup_batch(tokenizer, 400, np.random.default_rng(0), true_verdicts=True)
    np.testing.assert_array_equal(true["tokens"][:, :16], batch["tokens"][:, :16])
    assert all(verdict == truth for verdict, truth in _verdicts_and_truths(tokenizer, true))


def test_write_heldout_is_readable_pairs_file(tmp_path):
    path = toy.write_heldout(str(tmp_path / "toy" / "heldout.jsonl"), n=50, seed=4)
    assert os.listdir(tmp_path / "toy") == ["heldout.jsonl"]
    pairs = preference.read_preferences(path)
    expected = toy.make_toy_pairs(50, seed=4, split="heldout")
    assert [(p.query, p.chosen, p.rejected) for p in pairs] == [(p.query, p.chosen, p.rejected) for p in expected]


def test_toy_config_carries_the_measured_settings():
    config = yaml.safe_load(resources.files("rrm_jax").joinpath("configs/toy.yaml").read_text())
    model, rollout, loss, opt, warmup = (config[k] for k in ("model", "rollout", "loss", "optimizer", "warmup"))
    assert (
        model["hidden_size"],
        model["num_layers"],
        model["num_heads"],
        model["num_kv_heads"],
        model["intermediate_size"],
    ) == (128, 2, 4, 2, 336)
    assert model["tie_word_embeddings"] is True
    assert (warmup["steps"], warmup["batch_size"], warmup["lr"]) == (60, 256, 1e-3)
    assert (rollout["prompts_per_step"], rollout["samples_per_prompt"], rollout["temperature"]) == (256, 4, 1.0)
    assert (loss["clip_low"], loss["clip_high"], loss["kl_coef"], loss["entropy_coef"], loss["entropy_on"]) == (
        0.2,
        0.2,
        0.0,
        0.1,
        "verdict",
    )
    assert (opt["lr"], opt["warmup_steps"], opt["grad_clip"]) == (1e-3, 20, 1.0)
    assert config["data"]["max_prompt_len"] >= 16
    assert (config["guard"]["format_penalty"], config["guard"]["truncation_penalty"]) == (0.5, 0.5)
