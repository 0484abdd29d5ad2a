"""`rrm-jax <command>`: one entry point; each command lives in the module that owns its concept.

Every command module exposes `configure(parser)`, which adds its flags and sets `parser.set_defaults(run=fn)`.
Modules are imported lazily so `rrm-jax --help` stays fast and one command's imports never slow another.
The device commands keep JAX's persistent compilation cache on (`rrm_jax.compile_cache`: `--compile-cache
DIR|off`, $RRM_JAX_COMPILE_CACHE), set up before anything compiles.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

from rrm_jax.errors import EXIT_CTRL_C, Stopped, UserError

# command name -> (module, one-line help)
COMMANDS = {
    "convert": ("rrm_jax.model.convert", "convert between Hugging Face folders and rrm-jax checkpoints"),
    "generate": ("rrm_jax.generate_cli", "generate from JSONL prompts with the jitted sampler"),
    "bench": ("rrm_jax.bench_cli", "throughput benchmarks with roofline figures"),
    "judge": ("rrm_jax.rrm.judge_cli", "judge which of two responses is better (reasoning + verdict)"),
    "rank": ("rrm_jax.rrm.rank", "best-of-N selection by ELO round robin or knockout tournament"),
    "train": ("rrm_jax.rl.train_cli", "train a judge with GRPO (default: the embedded toy task)"),
    "eval": ("rrm_jax.eval", "evaluate a judge on RewardBench, PandaLM, LLMBar or preference pairs"),
    "plan": ("rrm_jax.plan", "per-device memory plan of a training config; refuses one that does not fit"),
}


# commands that run computations on devices: they take the multi-process flags and start jax.distributed
DEVICE_COMMANDS = ("generate", "bench", "judge", "rank", "train", "eval")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to a flag's help unless X is None or False (a flag whose default is None
    says in its help what it does then), or the help already tells."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad flags as one line with exit code 2 (its usage dump is noise in logs),
    and shows every flag's default in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # `--vote 3` is a mistake, not `--votes 3`
        super().__init__(*args, **kwargs)
        # "-1,1,4" (--mesh) is a value, not a flag: argparse only knows plain negative numbers
        self._negative_number_matcher = re.compile(r"^-\d+$|^-\d*\.\d+$|^-\d+(,-?\d+)+$")

    def error(self, message):
        self.exit(2, f"rrm-jax: error: {message}\n")


def _leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers that end a command line: `parser` itself, or those of its sub-commands (`bench sample`)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [parser]
    return [leaf for a in subs for p in dict.fromkeys(a.choices.values()) for leaf in _leaf_parsers(p)]


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = _Parser(prog="rrm-jax", description="JAX toolkit for Reward Reasoning Models")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    wanted = argv[0] if argv else None
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == wanted:  # only the chosen command's module is imported
            importlib.import_module(module).configure(p)
            if name in DEVICE_COMMANDS:
                from rrm_jax import compile_cache, distributed

                for leaf in _leaf_parsers(
                    p
                ):  # `bench sample --compile-cache DIR`, not `bench --compile-cache DIR sample`
                    compile_cache.add_cli_flags(leaf)
                    distributed.add_cli_flags(leaf)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    device = args.command in DEVICE_COMMANDS
    try:
        if device:
            from rrm_jax import compile_cache, distributed

            compile_cache.setup(args.compile_cache)  # before the first compilation
            distributed.initialize_from_args(args)  # one of several processes: join them before touching a device
        result = args.run(args)
    except UserError as e:
        print(f"rrm-jax: error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:  # stopped on a signal, its finished work saved and reported
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C before the command could stop cleanly (while starting, or a second one)
        print("\nrrm-jax: interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_CTRL_C
    finally:
        if device:
            compile_cache.print_report()
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
