"""What the `judge`, `rank` and `eval` commands share: the judge's flags, the `Judge` they make, the
settings a run's partial file records, reading the input rows, and the journaled run that `--resume`
continues and SIGTERM / Ctrl-C stop cleanly.

The model is loaded through `rrm_jax.rrm.judge.load_backend` (looked up on the module, so tests can stand a
scripted judge in for it).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from rrm_jax import distributed, model_identity, options, resumable
from rrm_jax.data.rows import read_rows
from rrm_jax.decoding import Decoding
from rrm_jax.errors import Stopped
from rrm_jax.rrm import judge as judging
from rrm_jax.rrm import spec
from rrm_jax.rrm.prompt import chat_template_named


def add_judge_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, voting and decoding flags common to `judge`, `rank` and `eval`."""
    parser.add_argument("--model", required=True, help="HF folder or rrm-jax checkpoint of the judge")
    parser.add_argument("--votes", type=int, default=1, help="samples per comparison; majority verdict")
    parser.add_argument("--both-orders", action="store_true", help="judge each pair in both A/B orders (2x samples)")
    parser.add_argument("--seed", type=int, default=0, help="seed for A/B order, sampling and brackets")
    parser.add_argument("--temperature", type=float, default=spec.EVAL_TEMPERATURE, help="sampling temperature")
    parser.add_argument("--top-p", type=float, default=spec.EVAL_TOP_P, help="nucleus sampling mass")
    parser.add_argument("--top-k", type=int, default=spec.EVAL_TOP_K, help="top-k filter, 0 = off")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"tokens generated per sample (default: {spec.EVAL_MAX_NEW_TOKENS} as in the published "
        f"evaluations, capped per prompt at what the model's context leaves)",
    )
    parser.add_argument(
        "--max-think-tokens",
        type=int,
        default=None,
        help="thinking budget: force </think> after M tokens (default: no budget)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, help="prompts decoding at once (the engine's slots hold their votes)"
    )
    options.add_prompts_per_call_argument(parser)
    options.add_kv_pool_argument(parser)
    parser.add_argument(
        "--chat-template",
        default=None,
        help="use this named chat template (deepseek-r1-distill) "
        "instead of the tokenizer's; needed when the tokenizer has none (default: the tokenizer's)",
    )
    options.add_mesh_argument(parser)


def decoding_from_args(args: argparse.Namespace) -> Decoding:
    """The decoding flags, validated (a bad value is a UserError naming it)."""
    return Decoding(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        max_think_tokens=args.max_think_tokens,
    )


def judge_from_args(
    args: argparse.Namespace,
    *,
    progress: bool,
    journal: judging.JudgmentJournal | None = None,
    stop_requested: Callable[[], bool] | None = None,
    model: str | None = None,
) -> judging.Judge:
    """The Judge of the command line's flags; `model`: the folder to load instead of --model (the one
    a journal recorded)."""
    decoding = decoding_from_args(args)  # checked before the (slow) model load
    judging.check_votes_and_batch_size(args.votes, args.batch_size)
    kv_pool_gb = options.kv_pool_gb(args)
    chat_template = chat_template_named(args.chat_template) if args.chat_template else None
    generate, tokenizer = judging.load_backend(model or args.model, mesh_shape=args.mesh)
    return judging.Judge(
        generate,
        tokenizer,
        votes=args.votes,
        both_orders=args.both_orders,
        seed=args.seed,
        decoding=decoding,
        batch_size=args.batch_size,
        chat_template=chat_template,
        prompts_per_call=options.prompts_per_call(args),
        kv_pool_gb=kv_pool_gb,
        progress=progress,
        journal=journal,
        stop_requested=stop_requested,
    )


def judge_settings(args: argparse.Namespace, rows: list[tuple[str, dict]], **extra) -> dict:
    """What a judging run's results depend on: stored in its partial file, compared on --resume."""
    return {
        "model": os.path.abspath(args.model) if os.path.exists(args.model) else args.model,
        **options.input_settings(args, rows),
        "votes": args.votes,
        "both_orders": args.both_orders,
        "seed": args.seed,
        **decoding_from_args(args).options(),
        "batch_size": args.batch_size,
        "prompts_per_call": options.prompts_per_call(args),
        "chat_template": args.chat_template,
        **extra,
    }


def rows_from_args(args: argparse.Namespace, columns: tuple[str, ...], allowed: str) -> list[tuple[str, dict]]:
    """The rows of --input (with --dataset-config / --dataset-split): rrm_jax.data.rows.read_rows."""
    return read_rows(
        args.input,
        dataset_config=args.dataset_config,
        dataset_split=args.dataset_split,
        columns=columns,
        allowed=allowed,
    )


def open_journal(args: argparse.Namespace, command: str, settings: dict, model: dict) -> judging.JudgmentJournal:
    """The JudgmentJournal of a command writing args.output, on its partial file (resumed with --resume);
    model: `model_identity.identify(args.model)`."""
    return judging.JudgmentJournal(
        resumable.PartialFile(args.output, command, settings, resume=args.resume, model=model)
    )


def run_journaled(args: argparse.Namespace, command: str, settings: dict, what: str, work: Callable):
    """`work(judge)` with its judgments journaled in OUTPUT.partial (`--resume` skips them) and SIGTERM /
    Ctrl-C honoured after the in-flight batch. -> (journal, judge, work's result); the caller finishes the
    journal's partial file. Raises Stopped after a signal (the line saying so printed)."""
    model = model_identity.identify(args.model)  # the step a run folder resolves to now, loaded below
    with resumable.StopSignals() as stop:
        journal = open_journal(args, command, settings, model)
        try:
            judge = judge_from_args(
                args, progress=True, journal=journal, stop_requested=stop.requested, model=model["path"]
            )
            result = work(judge)
            judging.warn_neutralised(judge)
            return journal, judge, result
        except resumable.Interrupted:
            if distributed.is_main_process():
                print(
                    f"{stop.name}: stopped with {len(journal)} {what} finished in {journal.partial.path}; "
                    f"run the same command with --resume to continue",
                    file=sys.stderr,
                )
            raise Stopped(stop.exit_code) from None
        finally:
            journal.partial.close()
