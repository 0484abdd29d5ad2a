"""A packed prefill with its attention in causal query blocks against one block over the whole row (what the
engine ran before), in one process: compile seconds and run milliseconds per pack, qwen2-40m, float32.

    .venv/bin/python benchmarks/prefill_attention.py [--rows 8 2] [--row-len 512] [--preset qwen2-40m]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rrm_jax.model import qwen2
from rrm_jax.model.config import preset


def pack(rows: int, row_len: int, vocab: int):
    """rows x row_len tokens, two prompts of row_len / 2 in each row, logits at each prompt's last token."""
    rng = np.random.default_rng(0)
    half = row_len // 2
    tokens = rng.integers(3, vocab, (rows, row_len))
    segments = np.repeat(np.arange(2 * rows), half).reshape(rows, row_len)
    positions = np.tile(np.arange(half), 2 * rows).reshape(rows, row_len)
    last = np.arange(half - 1, rows * row_len, half)
    return tuple(jnp.asarray(a, jnp.int32) for a in (tokens, segments, positions, last))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 2])
    ap.add_argument("--row-len", type=int, default=512)
    ap.add_argument("--preset", default="qwen2-40m")
    a = ap.parse_args()
    config = preset(a.preset)
    params = qwen2.Qwen2(config, rngs=nnx.Rngs(0)).params()
    blocked = qwen2.causal_query_blocks
    for rows in a.rows:
        args = pack(rows, a.row_len, config.vocab_size)
        logits = {}
        for name, blocks in (("one block a row", lambda T: [(0, T)]), ("causal query blocks", blocked)):
            qwen2.causal_query_blocks = blocks  # read while tracing, so each variant is its own program
            fn = jax.jit(lambda p, *x: qwen2.prefill_packed(config, p, *x))
            start = time.perf_counter()
            compiled = fn.lower(params, *args).compile()
            compile_s = time.perf_counter() - start
            logits[name] = jax.block_until_ready(compiled(params, *args))[0]
            times = []
            for _ in range(5):
                start = time.perf_counter()
                jax.block_until_ready(compiled(params, *args))
                times.append(time.perf_counter() - start)
            print(
                f"{rows} x {a.row_len}, {name}: {len(blocks(a.row_len))} block(s), compile {compile_s:.2f} s, "
                f"run {1e3 * np.median(times):.0f} ms (median of 5)",
                flush=True,
            )
        qwen2.causal_query_blocks = blocked
        diff = float(jnp.max(jnp.abs(logits["one block a row"] - logits["causal query blocks"])))
        print(f"{rows} x {a.row_len}: largest logit difference {diff:.1e}")


if __name__ == "__main__":
    main()
