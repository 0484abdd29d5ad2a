"""`rrm-jax generate`: JSONL prompts in, JSONL generations out."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tqdm import tqdm

from rrm_jax import distributed
from rrm_jax.errors import UserError


def read_prompt_rows(path: str) -> list[dict]:
    """Rows `{"prompt": str, "chat": bool?}` or `{"input_ids": [int, ...]}`; other fields pass through."""
    if not Path(path).is_file():
        raise UserError(f"input file {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{n}: each line must be a JSON object with 'prompt' or 'input_ids'")
            if "input_ids" in row:
                ids = row["input_ids"]
                if not isinstance(ids, list) or not all(isinstance(i, int) and i >= 0 for i in ids):
                    raise UserError(f"{path}:{n}: 'input_ids' must be a list of non-negative integers")
            elif not isinstance(row.get("prompt"), str):
                raise UserError(f"{path}:{n}: needs a string 'prompt' or a list 'input_ids'")
            rows.append(row)
    if not rows:
        raise UserError(f"{path} holds no rows")
    return rows


def encode_rows(rows: list[dict], tokenizer, path: str) -> list[list[int]]:
    prompts = []
    for n, row in enumerate(rows, 1):
        if "input_ids" in row:
            prompts.append(row["input_ids"])
            continue
        if tokenizer is None:
            raise UserError(f"{path}: row {n} has a text 'prompt' but the model has no tokenizer; give 'input_ids'")
        if row.get("chat"):
            if not tokenizer.chat_template:
                raise UserError(f"{path}: row {n} asks for 'chat' but the tokenizer has no chat template")
            text = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}],
                                                 add_generation_prompt=True, tokenize=False)
            ids = tokenizer.encode(text, add_special_tokens=False)  # the template already placed them
        else:
            ids = tokenizer.encode(row["prompt"])
        if not ids:
            raise UserError(f"{path}: row {n} has an empty prompt")
        prompts.append(ids)
    return prompts


def write_jsonl_atomic(path: str, rows) -> None:
    """Write to a temporary file beside `path`, then rename: never a half-written output. In a
    multi-process run every process computes the same rows and process 0 writes them."""
    if not distributed.is_main_process():
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def run(args) -> int:
    from rrm_jax.checkpoint import load_model, load_tokenizer
    from rrm_jax.generate import check_prompts, sample

    rows = read_prompt_rows(args.input)
    tokenizer = load_tokenizer(args.model)
    prompts = encode_rows(rows, tokenizer, args.input)
    model, config = load_model(args.model)
    check_prompts(config, prompts, args.max_new_tokens)
    with tqdm(total=len(prompts), desc="generate", unit="prompt", file=sys.stderr) as bar:
        results = sample(model, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_p=args.top_p, top_k=args.top_k, num_samples=args.num_samples, seed=args.seed,
                         max_think_tokens=args.max_think_tokens, tokenizer=tokenizer,
                         batch_size=args.batch_size, progress=bar.update)
    out = []
    for i, r in enumerate(results):
        row = dict(rows[i // args.num_samples])
        if args.num_samples > 1:
            row["sample_index"] = i % args.num_samples
        row.update(output_ids=r.output_ids, text=r.text, finish_reason=r.finish_reason, logprobs=r.logprobs)
        out.append(row)
    write_jsonl_atomic(args.output, out)
    print(f"wrote {len(out)} generations to {args.output}", file=sys.stderr)
    return 0


def configure(parser):
    parser.add_argument("--model", required=True, help="HF folder, rrm-jax checkpoint or training output dir")
    parser.add_argument("--input", required=True, help='JSONL rows {"prompt": ...} or {"input_ids": [...]}')
    parser.add_argument("--output", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per compiled batch")
    parser.add_argument("--max-think-tokens", type=int, default=None, help="force </think> after this many tokens")
    parser.set_defaults(run=run)
