"""Flags shared by the commands that run on devices: inputs (files or Hugging Face datasets), the
mesh over this process's devices, and --resume. Light to import: `rrm-jax <command> --help` stays instant."""

from __future__ import annotations

import argparse
import hashlib
import json
import os


def parse_mesh(text: str) -> tuple[int, int, int]:
    """argparse type of --mesh: "DATA,FSDP,TP" (e.g. 1,1,4; -1 = the remaining devices)."""
    parts = text.split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or any(v < 1 and v != -1 for v in shape):
        raise argparse.ArgumentTypeError(f"{text!r} is not DATA,FSDP,TP: three sizes >= 1 or -1, e.g. 1,1,4")
    return shape


def add_mesh_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mesh",
        type=parse_mesh,
        default=None,
        metavar="DATA,FSDP,TP",
        help="mesh over this process's devices, -1 = the remaining ones (e.g. 1,1,4: tensor-parallel "
        "over a 4-chip host); default: the process's first device",
    )


def add_input_arguments(parser: argparse.ArgumentParser, what: str, *, required: bool = True) -> None:
    """--input (a file or a Hugging Face dataset) with the dataset's --dataset-config / --dataset-split."""
    parser.add_argument(
        "--input",
        required=required,
        help=f"{what}: a JSONL, JSON or Parquet file, a folder written by Dataset.save_to_disk, "
        f"or a Hugging Face dataset name (loaded from the local cache when offline)",
    )
    parser.add_argument("--dataset-config", default=None, help="the dataset's config (subset), e.g. for a hub dataset")
    parser.add_argument(
        "--dataset-split",
        default=None,
        help="the dataset's split, e.g. filtered for allenai/reward-bench (default: its only split)",
    )


def add_resume_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUTPUT.partial, the items an interrupted run (kill, SIGTERM) finished",
    )


def local_mesh(shape: tuple[int, int, int] | None):
    """None (the process's first device) or a (data, fsdp, tp) mesh of `shape` over this process's devices."""
    if shape is None:
        return None
    import jax

    from rrm_jax import parallel

    return parallel.make_mesh(*shape, devices=jax.local_devices())


def input_settings(args: argparse.Namespace, rows: list[tuple[str, dict]]) -> dict:
    """The input's name and a hash of its rows, so an input file changed in place is noticed too."""
    digest = hashlib.sha256(
        json.dumps([row for _, row in rows], sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
    ).hexdigest()
    source = os.path.abspath(args.input) if os.path.exists(args.input) else args.input
    return {
        "input": source,
        "dataset_config": args.dataset_config,
        "dataset_split": args.dataset_split,
        "input_rows_sha256": digest,
    }


CALL_BATCHES = 8  # default planned batch: this many --batch-size worths of prompts per sampler call


def add_prompts_per_call_argument(parser) -> None:
    parser.add_argument(
        "--prompts-per-call",
        type=int,
        default=None,
        help="prompts per planned batch: one sampler call, the unit split over processes and "
        "saved to the partial file; the engine keeps --batch-size of them decoding, refilling "
        f"slots as rows finish (default: {CALL_BATCHES} x --batch-size)",
    )


def prompts_per_call(args) -> int:
    n = args.prompts_per_call if args.prompts_per_call is not None else CALL_BATCHES * args.batch_size
    if n < 1:
        from rrm_jax.errors import UserError

        raise UserError(f"--prompts-per-call must be >= 1, got {n}")
    return n


def add_kv_pool_argument(parser) -> None:
    parser.add_argument(
        "--kv-pool-gb",
        type=float,
        default=None,
        metavar="GB",
        help="the KV cache as a pool of pages, GB per device, on accelerators and meshes (ignored on one CPU "
        "device): the rows decoding at once are bounded by the tokens they hold, so raise --batch-size with it "
        "(default: room for --batch-size prompts' rows at their cap); results do not depend on it",
    )


def kv_pool_gb(args) -> float | None:
    if args.kv_pool_gb is not None and not args.kv_pool_gb > 0:
        from rrm_jax.errors import UserError

        raise UserError(f"--kv-pool-gb must be a positive number of GB, got {args.kv_pool_gb}")
    return args.kv_pool_gb
