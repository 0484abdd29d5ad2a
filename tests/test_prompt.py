"""The RRM prompt renders byte for byte as the released models expect, and verdicts parse by the spec's rule."""

import json
from pathlib import Path

import pytest
from judge_utils import BOS, build_test_tokenizer

from rrm_jax.errors import UserError
from rrm_jax.rrm import spec
from rrm_jax.rrm.prompt import chat_template_named, encode, parse_verdict, render, render_ids

SPEC = json.loads((Path(__file__).parent / "data" / "rrm_prompt_spec.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_test_tokenizer(tmp_path_factory.mktemp("tok"))


def test_package_constants_equal_the_spec():
    assert spec.SYSTEM_PROMPT == SPEC["system_prompt"]
    assert spec.USER_TEMPLATE == SPEC["user_template"]
    assert spec.USER_SUFFIX == SPEC["user_suffix"]
    assert spec.DEEPSEEK_R1_DISTILL_CHAT_TEMPLATE == SPEC["chat_template_deepseek_r1_distill"]
    decoding = SPEC["decoding_for_evaluation"]
    assert (spec.EVAL_TEMPERATURE, spec.EVAL_TOP_P, spec.EVAL_MAX_NEW_TOKENS) == (
        decoding["temperature"],
        decoding["top_p"],
        decoding["max_new_tokens"],
    )


def test_render_is_byte_identical_to_the_spec_example(tokenizer):
    example = SPEC["rendered_example"]
    text = render(tokenizer, example["question"], example["answer1"], example["answer2"])
    assert text == example["rendered_prompt"]
    assert text.startswith(BOS) and text.endswith("<｜Assistant｜><think>\n")


def test_encode_adds_no_second_bos(tokenizer):
    example = SPEC["rendered_example"]
    text = example["rendered_prompt"]
    ids = render_ids(tokenizer, example["question"], example["answer1"], example["answer2"])
    bos_id = tokenizer.convert_tokens_to_ids(BOS)
    assert ids == encode(tokenizer, text)
    assert ids[0] == bos_id and ids[1] != bos_id
    assert tokenizer(text)["input_ids"] == [bos_id] + ids  # what the default tokenization would have done
    assert tokenizer.decode(ids) == text
    # The chat markers are single tokens, as in the released tokenizer.
    for marker in ("<｜User｜>", "<｜Assistant｜>", "<think>"):
        assert ids.count(tokenizer.convert_tokens_to_ids(marker)) == 1


def test_render_keeps_braces_and_newlines_in_user_text(tokenizer):
    text = render(tokenizer, "Fill {answer1} in", "a {b} }{", "line1\n\nline2")
    assert "## Query\n\nFill {answer1} in\n\n## Assistant responses" in text
    assert "### Assistant 1\n\na {b} }{\n\n\n### Assistant 2\n\nline1\n\nline2\n\n## Analysis" in text


def test_tokenizer_without_chat_template_is_a_user_error_unless_one_is_named(tmp_path):
    plain = build_test_tokenizer(tmp_path, chat_template=None)
    with pytest.raises(UserError, match="no chat template.*--chat-template deepseek-r1-distill"):
        render(plain, "q", "a", "b")
    example = SPEC["rendered_example"]
    named = chat_template_named("deepseek-r1-distill")
    assert (
        render(plain, example["question"], example["answer1"], example["answer2"], chat_template=named)
        == example["rendered_prompt"]
    )
    with pytest.raises(UserError, match="unknown chat template 'chatml'; known: deepseek-r1-distill"):
        chat_template_named("chatml")


@pytest.mark.parametrize(
    "generated, verdict",
    [
        ("Response 1 is right.\n</think>\n\n\\boxed{Assistant 1}", 1),
        ("reasoning</think>\\boxed{Assistant 2}", 2),
        # The generation starts inside <think>: a boxed answer before </think> does not count.
        ("I think \\boxed{Assistant 1} maybe\n</think>\n\n\\boxed{Assistant 2}", 2),
        ("only thinking \\boxed{Assistant 1}\n</think>\n\nno verdict", None),
        ("thinking \\boxed{Assistant 1} without ever closing", None),
        # Several boxed answers after </think>: the last one counts.
        ("</think> \\boxed{Assistant 1} on reflection \\boxed{Assistant 2}", 2),
        ("</think> \\boxed{Assistant 2} then \\boxed{Assistant 1}.", 1),
        # Two </think>: only the text between the first and the second counts.
        ("a</think>\\boxed{Assistant 1}</think>\\boxed{Assistant 2}", 1),
        ("a</think>nothing here</think>\\boxed{Assistant 2}", None),
        # Nested braces are matched; the content must be exactly "Assistant 1" / "Assistant 2".
        ("</think>\\boxed{\\text{Assistant 1}}", None),
        ("</think>\\boxed{Assistant {1}}", None),
        ("</think>\\boxed{Assistant 1}}", 1),
        ("</think>\\boxed{Assistant 1", None),
        ("</think>\\fbox{Assistant 1}", None),
        ("</think>\\fbox{Assistant 2} \\boxed{Assistant 1}", 1),
        # Whitespace variants are not accepted.
        ("</think>\\boxed{ Assistant 1}", None),
        ("</think>\\boxed{Assistant 1 }", None),
        ("</think>\\boxed{Assistant  2}", None),
        ("</think>\\boxed{assistant 2}", None),
        ("</think>\\boxed {Assistant 2}", None),
        ("</think>\n\n\\boxed{Assistant 3}", None),
        ("</think>\n\nAssistant 1", None),
        ("", None),
    ],
)
def test_parse_verdict(generated, verdict):
    assert parse_verdict(generated) == verdict
