"""`rrm-jax generate`: JSONL prompts (or a Hugging Face dataset) in, JSONL generations out.

Prompts are cut into a batch plan (`worksplit`: similar lengths together, --batch-size prompts each, a
seed per batch); on several processes each runs its share of the batches on its own devices and
process 0 writes. Finished prompts go into OUTPUT.partial as they finish (`--resume` continues);
OUTPUT appears, in input order, when all are done.
"""

from __future__ import annotations

import json
import os
import sys

from rrm_jax import distributed, model_identity, options, resumable, worksplit
from rrm_jax.data import sources
from rrm_jax.data.rows import read_rows
from rrm_jax.errors import UserError

DEFAULT_MAX_NEW_TOKENS = 256  # capped per prompt at what the model's context leaves
SHOWN = 3  # generations printed at the end, as `judge` prints its judgments


PROMPT_FIELDS = "'prompt' (a string) or 'input_ids' (a list of token ids)"


def read_prompt_rows(path: str, *, dataset_config: str | None = None, dataset_split: str | None = None) -> list[dict]:
    """Rows `{"prompt": str, "chat": bool?}` or `{"input_ids": [int, ...]}`; other fields pass through.
    `path` is a JSONL, JSON-list or Parquet file, or a Hugging Face dataset with a `prompt` or `input_ids`
    column."""
    return [
        row for _, row in read_located_prompt_rows(path, dataset_config=dataset_config, dataset_split=dataset_split)
    ]


def read_located_prompt_rows(
    path: str, *, dataset_config: str | None = None, dataset_split: str | None = None
) -> list[tuple[str, dict]]:
    """read_prompt_rows, each row with where it was read (`FILE line N`, or the dataset's row)."""
    located = read_rows(path, dataset_config=dataset_config, dataset_split=dataset_split, allowed=PROMPT_FIELDS)
    if sources.is_dataset(path) and not {"prompt", "input_ids"} & set(located[0][1]):
        raise UserError(
            f"{sources.describe(path, dataset_config, dataset_split)}: missing column 'prompt' "
            f"(it has {', '.join(located[0][1])}; rows need 'prompt' or 'input_ids')"
        )
    for where, row in located:
        if row.get("input_ids") is not None:
            ids = row["input_ids"]
            if not isinstance(ids, list) or not all(isinstance(i, int) and i >= 0 for i in ids):
                raise UserError(f"{where}: 'input_ids' must be a list of non-negative integers")
        elif not isinstance(row.get("prompt"), str):
            raise UserError(f"{where}: needs a string 'prompt' or a list 'input_ids'")
    return located


def encode_rows(rows: list[dict], tokenizer, where) -> list[list[int]]:
    """Token ids of each row; `where`: each row's location (read_located_prompt_rows), or the input's
    name, for the error lines."""
    from rrm_jax.data.prompts import policy_prompt_text

    at = where if not isinstance(where, str) else [f"{where} row {n}" for n in range(1, len(rows) + 1)]
    prompts = []
    for place, row in zip(at, rows):
        if row.get("input_ids") is not None:
            prompts.append(row["input_ids"])
            continue
        if tokenizer is None:
            raise UserError(f"{place}: a text 'prompt' but the model has no tokenizer; give 'input_ids'")
        if not row["prompt"]:
            raise UserError(f"{place}: an empty prompt")
        if row.get("chat"):
            if not tokenizer.chat_template:
                raise UserError(f"{place}: asks for 'chat' but the tokenizer has no chat template")
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": row["prompt"]}], add_generation_prompt=True, tokenize=False
            )
            ids = tokenizer.encode(text, add_special_tokens=False)  # the template already placed them
        else:  # BOS + text, as the toy policy trainer prompts (rrm_jax.data.prompts)
            ids = tokenizer.encode(
                policy_prompt_text(tokenizer, row["prompt"], chat_template=False), add_special_tokens=False
            )
        prompts.append(ids)
    return prompts


def generate_settings(args, rows: list[dict]) -> dict:
    """What the generations depend on: stored in the partial file, compared on --resume."""
    model = os.path.abspath(args.model) if os.path.exists(args.model) else args.model
    return {
        "model": model,
        **options.input_settings(args, [("", row) for row in rows]),
        **{
            key: getattr(args, key)
            for key in (
                "max_new_tokens",
                "temperature",
                "top_p",
                "top_k",
                "num_samples",
                "seed",
                "batch_size",
                "max_think_tokens",
            )
        },
        "prompts_per_call": options.prompts_per_call(args),
    }


def run(args) -> int:
    from rrm_jax.checkpoint import load_model, load_tokenizer
    from rrm_jax.generate import check_prompts

    options.kv_pool_gb(args)  # a bad value fails before anything is read or written
    located = read_located_prompt_rows(args.input, dataset_config=args.dataset_config, dataset_split=args.dataset_split)
    rows = [row for _, row in located]
    loaded = model_identity.identify(args.model)  # a run folder's newest step now: the one loaded below
    tokenizer = load_tokenizer(loaded["path"])
    prompts = encode_rows(rows, tokenizer, [where for where, _ in located])
    with resumable.StopSignals() as stop:
        partial = resumable.PartialFile(
            args.output, "generate", generate_settings(args, rows), resume=args.resume, model=loaded
        )
        generated = {r["index"]: r["samples"] for r in partial.records}
        try:
            model, config = load_model(loaded["path"], mesh=options.local_mesh(args.mesh))
            limits = max_new_tokens(args.max_new_tokens, prompts, config.max_position_embeddings)
            check_prompts(config, prompts, limits)
            _generate_all(args, model, tokenizer, prompts, limits, generated, partial, stop.requested)
        except resumable.Interrupted:
            if distributed.is_main_process():
                print(
                    f"{stop.name}: stopped with {len(generated)} prompts finished in {partial.path}; run the same "
                    f"command with --resume to continue",
                    file=sys.stderr,
                )
            return stop.exit_code
        finally:
            partial.close()
    lines = _output_lines(rows, generated, args.num_samples)
    partial.finish("".join(line + "\n" for line in lines))
    if distributed.is_main_process():
        _show(rows, generated, args.num_samples)
        print(f"wrote {len(lines)} generations to {args.output}", file=sys.stderr)
    return 0


def max_new_tokens(flag: int | None, prompts: list[list[int]], context: int) -> int | list[int]:
    """--max-new-tokens as given, or by default 256 per prompt capped at what the model's context leaves."""
    if flag is not None:
        return flag
    return [max(1, min(DEFAULT_MAX_NEW_TOKENS, context - len(p))) for p in prompts]


def _show(rows: list[dict], generated: dict, num_samples: int) -> None:
    """The first few generations on stdout, each under its prompt."""
    for i in range(min(SHOWN, len(rows))):
        prompt = (
            rows[i]["prompt"]
            if rows[i].get("prompt") is not None
            else f"input_ids ({len(rows[i]['input_ids'])} tokens)"
        )
        for k, sample_row in enumerate(generated[i]):
            which = f", sample {k + 1}/{num_samples}" if num_samples > 1 else ""
            answer = sample_row["text"] if sample_row["text"] is not None else sample_row["output_ids"]
            print(f"--- prompt {i + 1}/{len(rows)}{which} ({sample_row['finish_reason']}): {prompt!r} ---\n{answer}\n")


def _generate_all(
    args, model, tokenizer, prompts: list[list[int]], limits, generated: dict, partial, stop_requested
) -> None:
    """Sample every prompt not in `generated` yet (planned batches split over the processes), adding
    each finished batch to `generated` and to the partial file."""
    from tqdm import tqdm

    from rrm_jax.generate import sample

    plan = worksplit.plan_batches([len(p) for p in prompts], [1] * len(prompts), options.prompts_per_call(args))
    todo = [b for b, items in enumerate(plan) if any(i not in generated for i in items)]

    def run_batch(b: int) -> list[list[dict]]:
        batch_limits = limits if isinstance(limits, int) else [limits[i] for i in plan[b]]
        results = sample(
            model,
            [prompts[i] for i in plan[b]],
            max_new_tokens=batch_limits,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            num_samples=args.num_samples,
            seed=worksplit.batch_seed(args.seed, 0, b),
            max_think_tokens=args.max_think_tokens,
            tokenizer=tokenizer,
            batch_size=args.batch_size,
            kv_pool_gb=options.kv_pool_gb(args),
        )
        samples = [
            dict(output_ids=r.output_ids, text=r.text, finish_reason=r.finish_reason, logprobs=r.logprobs)
            for r in results
        ]
        return [samples[k * args.num_samples : (k + 1) * args.num_samples] for k in range(len(plan[b]))]

    with tqdm(
        total=len(prompts),
        initial=len(generated),
        desc="generate",
        unit="prompt",
        file=sys.stderr,
        disable=not distributed.is_main_process(),
    ) as bar:

        def on_round(finished) -> None:
            new = []
            for b, per_prompt in finished:
                for i, samples in zip(plan[b], per_prompt):
                    if i not in generated:
                        generated[i] = samples
                        new.append({"call": 0, "index": i, "samples": samples})
                bar.update(len(plan[b]))
            partial.append(new)

        worksplit.run_rounds(todo, run_batch, on_round, stop_requested=stop_requested)


def _output_lines(rows: list[dict], generated: dict, num_samples: int) -> list[str]:
    """One JSON line per generation, in input order: the input row plus the sample."""
    lines = []
    for i, row in enumerate(rows):
        for k, sample_row in enumerate(generated[i]):
            row_out = dict(row)
            if num_samples > 1:
                row_out["sample_index"] = k
            row_out.update(sample_row)
            lines.append(json.dumps(row_out, ensure_ascii=False, default=str))
    return lines


def configure(parser):
    parser.add_argument("--model", required=True, help="HF folder, rrm-jax checkpoint or training output dir")
    options.add_input_arguments(parser, 'rows {"prompt": ...} or {"input_ids": [...]}')
    parser.add_argument("--output", required=True, help="JSONL file for the generations")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"tokens generated per sample (default: {DEFAULT_MAX_NEW_TOKENS}, capped per prompt at "
        f"what the model's context leaves)",
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--top-k", type=int, default=0, help="top-k filter, 0 = off")
    parser.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    parser.add_argument("--seed", type=int, default=0, help="seeds each batch's sampling")
    parser.add_argument(
        "--batch-size", type=int, default=64, help="prompts decoding at once (the engine's slots hold their samples)"
    )
    options.add_prompts_per_call_argument(parser)
    options.add_kv_pool_argument(parser)
    parser.add_argument(
        "--max-think-tokens", type=int, default=None, help="force </think> after this many tokens (default: no budget)"
    )
    options.add_mesh_argument(parser)
    options.add_resume_argument(parser)
    parser.set_defaults(run=run)
