"""Benchmark evaluation of an RRM judge: RewardBench, PandaLM, LLMBar and plain preference pairs.

`rrm-jax eval --model DIR --input FILE --format rewardbench|pandalm|llmbar|pairs --output results.json`

Per item the judge's majority verdict earns 1 if it picks the preferred response, 0 if the other one,
0.5 on a tie of votes (with one vote: an unparseable output), the spec's benchmark scoring.

- rewardbench: rows {prompt, chosen, rejected, subset}; accuracy per subset, section scores weighted
  by RewardBench's example counts, overall = mean of the four sections (`rewardbench_scores`).
- pandalm: the PandaLM test set (instruction, input, response1, response2, annotator1..3 with
  0 = tie, 1, 2); the label is the annotators' majority (no majority: tie). The query is the
  instruction, followed by a blank line and the input when there is one. An RRM never answers "tie":
  for the three-class accuracy and macro-F1 over {tie, 1, 2} a tie of votes (an unparseable output)
  counts as predicting "tie", so on the human-tie items it is almost always wrong; `non_tie_accuracy`
  scores the items with a 1/2 label the usual way (1 / 0 / 0.5).
- llmbar: rows {input, output_1, output_2, label (1 or 2)}; pairs: rows {prompt, chosen, rejected}.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass

from rrm_jax import distributed, options
from rrm_jax.data.rows import read_rows, require_text
from rrm_jax.errors import UserError
from rrm_jax.rrm import spec
from rrm_jax.rrm.judge import Comparison, Judgment
from rrm_jax.rrm.judge_commands import add_judge_arguments, judge_settings, rows_from_args, run_journaled

FORMATS = ("rewardbench", "pandalm", "llmbar", "pairs")
TIE = 0  # PandaLM's label for "similar quality"


@dataclass
class Item:
    comparison: Comparison
    label: int  # 1 or 2: the preferred response; TIE (PandaLM only)
    subset: str | None = None


def rewardbench_scores(subset_accuracy: dict) -> dict:
    """The four RewardBench section scores and "overall" from per-subset accuracies.

    A section is the example-count-weighted mean of its subsets' accuracies (RewardBench's leaderboard
    weights, math-prm counted as 984); "overall" is the plain mean of the four sections. Keys that are
    no section's subset (e.g. prior sets, or metadata in a results file) are ignored; a section with
    none of its subsets present is left out, and "overall" needs all four.
    """
    scores = {}
    for section, subsets in spec.REWARDBENCH_SECTIONS.items():
        present = [s for s in subsets if s in subset_accuracy]
        if present:
            weight = sum(spec.REWARDBENCH_EXAMPLE_COUNTS[s] for s in present)
            scores[section] = sum(subset_accuracy[s] * spec.REWARDBENCH_EXAMPLE_COUNTS[s] for s in present) / weight
    if len(scores) == len(spec.REWARDBENCH_SECTIONS):
        scores["overall"] = sum(scores.values()) / len(scores)
    return scores


def pandalm_label(where: str, row: dict) -> int:
    """Majority of the three annotators' labels (0 tie, 1, 2); no majority counts as a tie."""
    labels = []
    for key in ("annotator1", "annotator2", "annotator3"):
        value = row.get(key)
        if value not in (0, 1, 2):
            raise UserError(f"{where}: {key!r} must be 0 (tie), 1 or 2, got {value!r}")
        labels.append(value)
    label, count = Counter(labels).most_common(1)[0]
    return label if count >= 2 else TIE


def three_class_metrics(labels: list[int], predictions: list[int]) -> dict:
    """Accuracy and macro-F1 over the classes {tie, 1, 2} (a class never predicted nor present has F1 0)."""
    f1s = []
    for cls in (TIE, 1, 2):
        tp = sum(y == cls and p == cls for y, p in zip(labels, predictions))
        predicted = sum(p == cls for p in predictions)
        actual = sum(y == cls for y in labels)
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    accuracy = sum(y == p for y, p in zip(labels, predictions)) / len(labels)
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / len(f1s)}


_FIELDS = {
    "rewardbench": "prompt, chosen, rejected, subset",
    "pairs": "prompt, chosen, rejected",
    "llmbar": "input, output_1, output_2, label (1 or 2)",
    "pandalm": "instruction, input, response1, response2, annotator1..3",
}


_COLUMNS = {
    "rewardbench": ("prompt", "chosen", "rejected", "subset"),
    "pairs": ("prompt", "chosen", "rejected"),
    "llmbar": ("input", "output_1", "output_2", "label"),
    "pandalm": ("instruction", "input", "response1", "response2", "annotator1", "annotator2", "annotator3"),
}


def read_items(
    path: str, fmt: str, *, dataset_config: str | None = None, dataset_split: str | None = None
) -> list[Item]:
    """The evaluation items of a file (JSON list, JSONL or Parquet) or dataset in one of FORMATS."""
    _check_format(fmt)
    rows = read_rows(
        path, dataset_config=dataset_config, dataset_split=dataset_split, columns=_COLUMNS[fmt], allowed=_FIELDS[fmt]
    )
    return items_from_rows(rows, fmt)


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")


def items_from_rows(rows: list[tuple[str, dict]], fmt: str) -> list[Item]:
    fields = _FIELDS[fmt]
    items = []
    for where, row in rows:

        def text(key: str, where=where, row=row) -> str:
            return require_text(where, row, key, fields)

        if fmt in ("rewardbench", "pairs"):
            subset = text("subset") if fmt == "rewardbench" else None
            items.append(Item(Comparison(text("prompt"), text("chosen"), text("rejected")), 1, subset))
        elif fmt == "llmbar":
            label = row.get("label")
            if label not in (1, 2):
                raise UserError(f"{where}: 'label' must be 1 or 2, got {label!r}")
            items.append(Item(Comparison(text("input"), text("output_1"), text("output_2")), label))
        else:
            instruction, context = text("instruction"), text("input")
            query = f"{instruction}\n\n{context}" if context else instruction
            items.append(Item(Comparison(query, text("response1"), text("response2")), pandalm_label(where, row)))
    return items


def score_items(fmt: str, items: list[Item], judgments: list[Judgment]) -> dict:
    """The metrics of one format from the items and their judgments (see the module docstring)."""
    metrics: dict = {}
    graded = [(it, j) for it, j in zip(items, judgments) if it.label != TIE]
    if graded:
        metrics["accuracy" if fmt != "pandalm" else "non_tie_accuracy"] = sum(
            j.score(it.label) for it, j in graded
        ) / len(graded)
    if fmt == "rewardbench":
        by_subset: dict[str, list[float]] = {}
        for it, j in graded:
            by_subset.setdefault(it.subset, []).append(j.score(it.label))
        metrics["subsets"] = {s: sum(v) / len(v) for s, v in sorted(by_subset.items())}
        metrics["sections"] = rewardbench_scores(metrics["subsets"])
    elif fmt == "pandalm":
        predictions = [TIE if j.winner is None else j.winner for j in judgments]
        metrics.update(three_class_metrics([it.label for it in items], predictions))
        metrics["label_counts"] = {str(k): v for k, v in sorted(Counter(it.label for it in items).items())}
    return metrics


def format_table(results: dict) -> str:
    """A two-column text table of the scores and counts in `results`."""
    metrics = results["metrics"]
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, float)]
    rows += [(f"subset {k}", v) for k, v in metrics.get("subsets", {}).items()]
    rows += [(f"section {k}" if k != "overall" else "overall", v) for k, v in metrics.get("sections", {}).items()]
    rows += [
        ("items", results["items"]),
        ("tied verdicts", results["tied_items"]),
        ("unparseable samples", f"{results['unparseable_samples']} of {results['samples']}"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(
        f"{name:<{width}}  {value * 100:6.2f}" if isinstance(value, float) else f"{name:<{width}}  {value}"
        for name, value in rows
    )


def configure(parser: argparse.ArgumentParser) -> None:
    add_judge_arguments(parser)
    options.add_input_arguments(parser, "the evaluation set")
    parser.add_argument("--format", required=True, choices=FORMATS, help="what the rows are")
    parser.add_argument("--output", required=True, help="results JSON")
    options.add_resume_argument(parser)
    parser.set_defaults(run=run_eval)


def evaluate(judge, items: list[Item], fmt: str) -> dict:
    """Judge every item (one batched pass) and return the results document written by `rrm-jax eval`."""
    judgments = judge([it.comparison for it in items])
    return {
        "format": fmt,
        "items": len(items),
        "metrics": score_items(fmt, items, judgments),
        "tied_items": sum(j.tie for j in judgments),
        "unparseable_samples": sum(j.unparseable for j in judgments),
        "samples": sum(len(j.verdicts) for j in judgments),
        # prompts_per_call too: the seed of every sampled batch comes from the batch plan it shapes
        "judge": {
            "votes": judge.votes,
            "both_orders": judge.both_orders,
            "seed": judge.seed,
            "batch_size": judge.batch_size,
            "prompts_per_call": judge.prompts_per_call,
            **judge.decoding.options(),
        },
        "per_item": [
            {
                "label": it.label,
                "subset": it.subset,
                "verdict": j.winner,
                "votes": {"1": j.votes_1, "2": j.votes_2, "unparseable": j.unparseable},
                "swapped": j.swapped,
            }
            for it, j in zip(items, judgments)
        ],
    }


def run_eval(args: argparse.Namespace) -> int:
    _check_format(args.format)
    rows = rows_from_args(args, _COLUMNS[args.format], _FIELDS[args.format])
    items = items_from_rows(rows, args.format)  # bad input fails before the model loads
    journal, _, results = run_journaled(
        args,
        "eval",
        judge_settings(args, rows, format=args.format),
        "items",
        lambda judge: {"model": args.model, "input": args.input, **evaluate(judge, items, args.format)},
    )
    journal.partial.finish(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    if distributed.is_main_process():
        print(format_table(results))
        print(f"results -> {args.output}")
    return 0
