"""`rrm-jax bench`: its flags, apart from rrm_jax.bench so that `rrm-jax bench --help` does not import JAX."""

from __future__ import annotations

import argparse
import importlib.util
import os

from rrm_jax.errors import UserError
from rrm_jax.model.config import dtype_arg

HF_METHODS = ("generate", "generate_batch")


class _CompareHF(argparse.Action):
    """--compare-hf: refused while parsing, before any JAX work, when torch (transformers' backend) is missing."""

    def __call__(self, parser, namespace, values, option_string=None):
        if importlib.util.find_spec("torch") is None:
            parser.error("--compare-hf times transformers on torch, which is not installed: pip install -e '.[hf]'")
        setattr(namespace, self.dest, values)


def _run(name: str):
    def run(args):
        if args.json and os.path.exists(args.json):  # no command replaces an output
            raise UserError(f"output {args.json} already exists; choose a new path or remove it")
        from rrm_jax import bench

        return getattr(bench, name)(args)

    return run


def configure(parser):
    sub = parser.add_subparsers(dest="bench", required=True, parser_class=type(parser))
    p = sub.add_parser("sample", help="sampling throughput (prefill, decode, MBU, MFU, vs transformers)")
    p.add_argument("--model", help="HF folder or rrm-jax checkpoint")
    p.add_argument("--preset", help="random weights with a preset's shape (e.g. r1-distill-qwen-1.5b)")
    p.add_argument(
        "--workload",
        choices=("fixed", "rrm", "cache"),
        default="fixed",
        help="fixed: every row prompt-len + gen-len tokens (roofline figures); rrm: ragged requests "
        "shaped like RRM judging (engine vs static batching vs transformers); cache: decode step "
        "time against the cache length allocated",
    )
    p.add_argument("--batch", type=int, nargs="+", default=[8], help="one or more batch sizes (cache: the first)")
    p.add_argument("--prompt-len", type=int, default=128, help="tokens per random prompt")
    p.add_argument("--gen-len", type=int, default=128, help="tokens generated per row (cache: decode steps timed)")
    p.add_argument(
        "--cache-lens",
        type=int,
        nargs="+",
        default=[192, 640, 2176, 4096],
        help="cache: allocated cache lengths to time",
    )
    p.add_argument("--requests", type=int, default=96, help="rrm: number of requests")
    p.add_argument(
        "--prompt-range",
        type=int,
        nargs=2,
        default=[64, 512],
        metavar=("LO", "HI"),
        help="rrm: prompt lengths, uniform over [LO, HI]",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=1024,
        help="rrm: the cap; output lengths are log-normal with median cap/8, about 3%% at the cap",
    )
    p.add_argument("--slots", type=int, default=16, help="rrm: the engine's slots = static batch size")
    p.add_argument(
        "--paged-rows",
        type=int,
        default=None,
        metavar="N",
        help="rrm: also run the engine with a paged KV cache of N slots in the bytes the contiguous cache of "
        "--slots slots takes, and report the rows it decodes at once (peak, mean), its preemptions and pages",
    )
    p.add_argument("--temperature", type=float, default=0.6, help="rrm: sampling temperature")
    p.add_argument("--no-static", action="store_true", help="rrm: skip the static-batching baseline")
    p.add_argument(
        "--prefill-tokens",
        type=int,
        default=None,
        help="rrm: the engine's prefill token budget (default: 512 on a CPU, 2048 on accelerators)",
    )
    p.add_argument(
        "--dtype",
        type=dtype_arg,
        default=None,
        help="float32 or bfloat16 (bf16, jnp.bfloat16 ... alike) (default: the stored dtype; float32 for a preset)",
    )
    p.add_argument(
        "--compare-hf",
        nargs="*",
        choices=HF_METHODS,
        default=None,
        metavar="METHOD",
        action=_CompareHF,
        help="also time transformers on the same weights: `generate` (static batches) and, with --workload "
        "rrm, `generate_batch` (its continuous batching); no METHOD: every one that applies",
    )
    p.add_argument("--json", help="write the results here")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts and weights")
    p.set_defaults(run=_run("run_sample"))

    t = sub.add_parser("train", help="GRPO step time split into rollout, logprob and update; MFU")
    t.add_argument("--model", help="HF folder or rrm-jax checkpoint")
    t.add_argument("--preset", help="random weights with a preset's shape")
    t.add_argument("--prompts", type=int, default=4, help="prompts per step")
    t.add_argument("--samples", type=int, default=4, help="samples per prompt (the GRPO group)")
    t.add_argument("--prompt-len", type=int, default=64, help="tokens per random prompt")
    t.add_argument("--gen-len", type=int, default=64, help="tokens generated per row")
    t.add_argument("--micro-batches", type=int, default=1, help="gradient accumulation steps")
    t.add_argument("--no-remat", action="store_true", help="keep activations instead of recomputing them")
    t.add_argument(
        "--dtype",
        type=dtype_arg,
        default=None,
        help="float32 or bfloat16 (bf16, jnp.bfloat16 ... alike) (default: the stored dtype; float32 for a preset)",
    )
    t.add_argument("--json", help="write the results here")
    t.add_argument("--seed", type=int, default=0, help="seed of the random prompts and weights")
    t.set_defaults(run=_run("run_train"))
