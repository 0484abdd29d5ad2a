"""Evaluation: RewardBench scoring against the published RRM results, PandaLM / LLMBar / pairs end to end on
copies of the real data with scripted judges, bad input, and one run through a tiny real model and the sampler."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from judge_utils import ScriptedGenerate, boxed, build_test_tokenizer

import rrm_jax
from rrm_jax import cli, load_model
from rrm_jax.errors import UserError
from rrm_jax.eval import pandalm_label, rewardbench_scores, three_class_metrics
from rrm_jax.rrm import judge as judge_module
from rrm_jax.rrm.prompt import parse_verdict

DATA = Path(__file__).parent / "data"


def load(name):
    return json.loads((DATA / name).read_text(encoding="utf-8"))


@pytest.mark.parametrize("model, overall", [("32b", 91.21), ("7b", 82.19)])
def test_rewardbench_scores_reproduce_the_published_rrm_results(model, overall):
    published = load(f"{model}_RewardBench_result.json")
    scores = rewardbench_scores(published)  # metadata keys in the file are ignored
    for section, value in published["leaderboard"].items():
        assert scores[section] == value  # exactly, not approximately
    assert round(100 * scores["overall"], 2) == overall


def test_rewardbench_scores_with_some_subsets_missing():
    chat = {"alpacaeval-easy": 1.0, "alpacaeval-length": 0.0, "mt-bench-easy": 0.5, "anthropic_helpful": 0.3}
    # (100 * 1 + 95 * 0 + 28 * 0.5) / (100 + 95 + 28), only Chat present, so no overall
    assert rewardbench_scores(chat) == {"Chat": pytest.approx(114 / 223)}


def test_three_class_metrics_by_hand():
    labels = [0, 1, 2, 1, 2, 2]
    predictions = [1, 1, 2, 2, 2, 0]
    # tie: P 0/1, R 0/1 -> F1 0; "1": P 1/2, R 1/2 -> 1/2; "2": P 2/3, R 2/3 -> 2/3
    metrics = three_class_metrics(labels, predictions)
    assert metrics == {"accuracy": 0.5, "macro_f1": pytest.approx((0 + 1 / 2 + 2 / 3) / 3)}


def test_pandalm_majority_label():
    assert pandalm_label("x", {"annotator1": 2, "annotator2": 0, "annotator3": 2}) == 2
    assert pandalm_label("x", {"annotator1": 0, "annotator2": 0, "annotator3": 1}) == 0
    assert pandalm_label("x", {"annotator1": 0, "annotator2": 1, "annotator3": 2}) == 0  # no majority: tie
    with pytest.raises(UserError, match="x: 'annotator3' must be 0 \\(tie\\), 1 or 2, got '2'"):
        pandalm_label("x", {"annotator1": 1, "annotator2": 1, "annotator3": "2"})


# --- end to end through `rrm-jax eval`, with scripted judges in place of the model ---


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_test_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def use_script(monkeypatch, tokenizer):
    """use_script(fn): `rrm-jax eval/judge/rank` judge with ScriptedGenerate(fn) instead of loading a model."""
    holder = {}

    def install(script):
        holder["generate"] = ScriptedGenerate(tokenizer, script)
        monkeypatch.setattr(judge_module, "load_backend", lambda path, **options: (holder["generate"], tokenizer))
        return holder["generate"]

    return install


def run_eval(tmp_path, input_path, fmt, *extra):
    out = tmp_path / "results.json"
    code = cli.main(["eval", "--model", "M", "--input", str(input_path), "--format", fmt, "--output", str(out), *extra])
    assert code == 0
    return json.loads(out.read_text())


def test_pandalm_end_to_end_with_pandalm_7b_as_the_judge(tmp_path, use_script, capsys):
    """The scripted judge answers with PandaLM-7B's published verdicts (its "tie" as an unparseable output)."""
    items = load("pandalm_testset_v1_sample.json")
    published = {r["idx"]: int(r["pandalm_result"]) for r in load("pandalm_7b_testset_v1_sample.json")}
    verdict_of = {}
    for r in items:
        query = r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")
        verdict_of[(query, r["response1"], r["response2"])] = (published[r["idx"]], r["response1"], r["response2"])

    def pandalm_7b(query, first, second, s):
        verdict, r1, r2 = verdict_of.get((query, first, second)) or verdict_of[(query, second, first)]
        if verdict == 0:
            return "Both are equally good.\n</think>\n\nTie"
        return boxed(1 if first == (r1, r2)[verdict - 1] else 2)

    use_script(pandalm_7b)
    results = run_eval(tmp_path, DATA / "pandalm_testset_v1_sample.json", "pandalm")
    metrics = results["metrics"]
    # By hand from the copied files (36 items; majority labels 8 tie / 14 "1" / 14 "2"; PandaLM-7B says
    # tie 6 times): 30 agree. Per class tp / predicted / actual: tie 4/6/8, "1" 12/14/14, "2" 14/16/14.
    assert metrics["accuracy"] == pytest.approx(30 / 36)
    assert metrics["macro_f1"] == pytest.approx((4 / 7 + 12 / 14 + 14 / 15) / 3)
    assert metrics["non_tie_accuracy"] == pytest.approx(27 / 28)  # 26 right and 2 ties at 0.5 on the 28 non-tie items
    assert metrics["label_counts"] == {"0": 8, "1": 14, "2": 14}
    assert (results["items"], results["tied_items"], results["unparseable_samples"]) == (36, 6, 6)
    table = capsys.readouterr().out
    assert "accuracy" in table and "83.33" in table and "unparseable samples  6 of 36" in table


def test_llmbar_end_to_end_with_a_length_biased_judge(tmp_path, use_script):
    items = load("LLMBar_Natural_sample.json")
    assert all(len(r["output_1"]) != len(r["output_2"]) for r in items)
    use_script(lambda q, first, second, s: boxed(1 if len(first) > len(second) else 2))
    results = run_eval(tmp_path, DATA / "LLMBar_Natural_sample.json", "llmbar")
    expected = sum(r["label"] == (1 if len(r["output_1"]) > len(r["output_2"]) else 2) for r in items) / len(items)
    assert results["metrics"]["accuracy"] == pytest.approx(expected)
    assert 0 < expected < 1 and results["unparseable_samples"] == 0


def test_llmbar_jsonl_with_unparseable_outputs_scores_half(tmp_path, use_script):
    items = load("LLMBar_Adversarial_Neighbor_sample.json")
    src = tmp_path / "neighbor.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in items))
    preferred = {r["input"]: r[f"output_{r['label']}"] for r in items}
    garbled = {r["input"] for r in items[:3]}

    def oracle(query, first, second, s):
        return "hmm" if query in garbled else boxed(1 if first == preferred[query] else 2)

    use_script(oracle)
    results = run_eval(tmp_path, src, "llmbar", "--votes", "2")
    assert results["metrics"]["accuracy"] == pytest.approx((9 + 3 * 0.5) / 12)
    assert (results["tied_items"], results["unparseable_samples"], results["samples"]) == (3, 6, 24)
    assert [p["verdict"] for p in results["per_item"]] == [None] * 3 + [r["label"] for r in items[3:]]


def test_rewardbench_format_on_its_llmbar_subsets(tmp_path, use_script):
    """RewardBench's llmbar-natural / llmbar-adver-neighbor subsets are these LLMBar items with chosen = the label."""
    rows = []
    for name, subset in (
        ("LLMBar_Natural_sample.json", "llmbar-natural"),
        ("LLMBar_Adversarial_Neighbor_sample.json", "llmbar-adver-neighbor"),
    ):
        for r in load(name):
            chosen, rejected = r[f"output_{r['label']}"], r[f"output_{3 - r['label']}"]
            rows.append(
                {"prompt": r["input"], "chosen": chosen, "rejected": rejected, "subset": subset, "id": len(rows)}
            )
    src = tmp_path / "rb.json"
    src.write_text(json.dumps(rows))
    use_script(lambda q, first, second, s: boxed(1 if len(first) > len(second) else 2))
    results = run_eval(tmp_path, src, "rewardbench")
    by_subset = {}
    for r in rows:
        by_subset.setdefault(r["subset"], []).append(float(len(r["chosen"]) > len(r["rejected"])))
    natural = sum(by_subset["llmbar-natural"]) / 12
    neighbor = sum(by_subset["llmbar-adver-neighbor"]) / 12
    assert results["metrics"]["subsets"] == {
        "llmbar-adver-neighbor": pytest.approx(neighbor),
        "llmbar-natural": pytest.approx(natural),
    }
    # Chat Hard weights its subsets by RewardBench's example counts (natural 100, neighbor 134).
    assert results["metrics"]["sections"] == {"Chat Hard": pytest.approx((100 * natural + 134 * neighbor) / 234)}


def test_pairs_format_and_judge_settings_in_results(tmp_path, use_script):
    src = tmp_path / "pairs.jsonl"
    src.write_text(
        '{"prompt": "2+2?", "chosen": "4", "rejected": "5"}\n{"prompt": "3+3?", "chosen": "6", "rejected": "7"}\n'
    )
    generate = use_script(lambda q, first, second, s: boxed(1 if first in ("4", "6") else 2))
    results = run_eval(tmp_path, src, "pairs", "--both-orders", "--max-think-tokens", "100", "--temperature", "0.3")
    assert results["metrics"] == {"accuracy": 1.0}
    assert results["judge"]["both_orders"] is True and results["judge"]["max_think_tokens"] == 100
    assert (generate.calls[0]["max_think_tokens"], generate.calls[0]["temperature"]) == (100, 0.3)
    assert results["samples"] == 4


def exit_code(argv):
    """cli.main's exit code, also for argparse errors (which exit through SystemExit)."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize(
    "fmt, content, message",
    [
        (
            "llmbar",
            '[{"input": "q", "output_1": "a", "output_2": "b", "label": 3}]',
            "in.json line 1: 'label' must be 1 or 2, got 3",
        ),
        (
            "rewardbench",
            '{"prompt": "q", "chosen": "a", "rejected": "b"}\n',
            "in.json line 1: missing field 'subset' (rows need prompt, chosen, rejected, subset)",
        ),
        (
            "pandalm",
            '[{"instruction": "q", "input": "", "response1": "a"}]',
            "in.json line 1: missing field 'response2'",
        ),
        ("pairs", "", "in.json: no rows"),
        ("pairz", '{"prompt": "q", "chosen": "a", "rejected": "b"}\n', "argument --format: invalid choice: 'pairz'"),
    ],
)
def test_eval_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, use_script, capsys, fmt, content, message):
    src, out = tmp_path / "in.json", tmp_path / "results.json"
    src.write_text(content)
    generate = use_script(lambda *a: boxed(1))
    assert exit_code(["eval", "--model", "M", "--input", str(src), "--format", fmt, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rrm-jax: error: ") and message in err and err.count("\n") == 1
    assert not out.exists() and generate.calls == []


# --- once through a tiny real model and the sampler ---


@pytest.fixture(scope="module")
def tiny_judge_folder(tmp_path_factory):
    """An HF folder with a random tiny Qwen2 and the test tokenizer (written by transformers)."""
    folder = tmp_path_factory.mktemp("tiny-judge")
    tok = build_test_tokenizer(folder)
    config = transformers.Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(folder)
    return folder


class SpySample:
    """`rrm_jax.sample` recording each call's prompts, max_new_tokens and results."""

    def __init__(self):
        self.real, self.calls = rrm_jax.sample, []

    def __call__(self, model, prompt_ids, **kw):
        results = self.real(model, prompt_ids, **kw)
        self.calls.append((prompt_ids, kw["max_new_tokens"], results))
        return results


def test_default_max_new_tokens_fits_a_small_models_context(tiny_judge_folder, tmp_path, monkeypatch):
    rows = tmp_path / "judge.jsonl"
    rows.write_text('{"query": "2+2?", "response_1": "4", "response_2": "5"}\n')
    judged = tmp_path / "judged.jsonl"
    context = load_model(tiny_judge_folder)[0].config.max_position_embeddings
    spy = SpySample()
    monkeypatch.setattr(rrm_jax, "sample", spy)
    # no --max-new-tokens: 8192 would not fit this model's context; each prompt gets what its context leaves
    assert (
        cli.main(
            [
                "judge",
                "--model",
                str(tiny_judge_folder),
                "--input",
                str(rows),
                "--output",
                str(judged),
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    ((prompts, limits, (result,)),) = spy.calls
    (prompt,) = prompts
    assert context == 4096 < 8192 and limits == [context - len(prompt)]
    # this random model's greedy text never ends: it runs to the last position of the context
    assert len(prompt) + len(result.output_ids) == context and result.finish_reason == "length"
    (record,) = [json.loads(line) for line in judged.read_text().splitlines()]
    assert record["reasoning"] == [result.text]


def test_judge_and_eval_through_a_tiny_real_model(tiny_judge_folder, tmp_path, monkeypatch):
    src = tmp_path / "pairs.jsonl"
    src.write_text(
        '{"prompt": "2+2?", "chosen": "4", "rejected": "5"}\n{"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven"}\n'
    )
    common = ["--model", str(tiny_judge_folder), "--max-new-tokens", "12", "--max-think-tokens", "4", "--votes", "2"]

    out = tmp_path / "results.json"
    spy = SpySample()
    monkeypatch.setattr(rrm_jax, "sample", spy)
    assert cli.main(["eval", "--input", str(src), "--format", "pairs", "--output", str(out), *common]) == 0
    results = json.loads(out.read_text())
    assert (results["items"], results["samples"]) == (2, 4)
    # A verdict takes 20 tokens ("</think>", then 19 one-byte tokens of "\boxed{Assistant 1}"), more than the
    # 12 generated: every sample is unparseable, so every item is a tie of votes and scores 0.5.
    texts = [s.text for _, _, samples in spy.calls for s in samples]
    assert len(texts) == 4 and [parse_verdict(t) for t in texts] == [None] * 4
    assert (results["unparseable_samples"], results["tied_items"]) == (4, 2)
    assert results["metrics"]["accuracy"] == 0.5

    rows = tmp_path / "judge.jsonl"
    rows.write_text('{"query": "2+2?", "response_1": "4", "response_2": "5"}\n')
    judged = tmp_path / "judged.jsonl"
    assert cli.main(["judge", "--input", str(rows), "--output", str(judged), *common]) == 0
    (record,) = [json.loads(line) for line in judged.read_text().splitlines()]
    assert len(record["reasoning"]) == 2
    for text in record["reasoning"]:
        # The thinking budget closed the thinking block after 4 generated tokens (one byte each).
        assert "\n</think>\n\n" in text and len(text.split("</think>")[0]) <= 4 + 1
    verdicts = [parse_verdict(t) for t in record["reasoning"]]
    assert record["votes"]["unparseable"] == verdicts.count(None)
