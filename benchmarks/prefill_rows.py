"""Prefill rows a call on this CPU (`engine.PREFILL_ROWS`), in one process: the time a prefill position
costs in packs of 1, 2 and 8 rows of 512 tokens, then whole warm runs of the short-request workload with
one row a call against eight, alternating (every program compiled before the first timed run).

    .venv/bin/python benchmarks/prefill_rows.py [--runs 3]
"""

import argparse
import collections
import statistics
import time

import jax
import numpy as np
from flax import nnx

from rrm_jax import engine
from rrm_jax.bench_rrm import rrm_workload
from rrm_jax.model import qwen2
from rrm_jax.model.config import preset
from rrm_jax.sampling import SamplingSettings

SLOTS, BUDGET = 64, 512


def position_ms(config, params) -> dict[int, float]:
    """Median ms a position of a prefill pack of R rows of 250-token prompts, over 7 interleaved calls."""
    rng = np.random.default_rng(0)
    reqs = [engine.Request(rng.integers(3, config.vocab_size, 250).tolist(), 10, i) for i in range(32)]
    packs = {
        rows: engine.pack_prompts(
            reqs, collections.deque(range(32)), list(range(SLOTS)), num_samples=1, budget=BUDGET, rows=rows, slots=SLOTS
        )[0]
        for rows in (1, 2, 8)
    }
    state = jax.device_put(engine._empty_state(config, SLOTS, 768, None, "rows"))
    for pack in packs.values():  # compile
        state = engine.prefill_fn(config, 1, None, params, state, pack, np.uint32(0))
    jax.block_until_ready(state)
    ms = collections.defaultdict(list)
    for _ in range(7):
        for rows, pack in packs.items():
            t = time.perf_counter()
            state = jax.block_until_ready(engine.prefill_fn(config, 1, None, params, state, pack, np.uint32(0)))
            ms[rows].append((time.perf_counter() - t) * 1000 / (rows * BUDGET))
    return {rows: statistics.median(v) for rows, v in ms.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="warm runs of each setting")
    args = parser.parse_args()
    assert jax.default_backend() == "cpu", "a CPU benchmark"
    config = preset("qwen2-40m").replace(param_dtype="float32", dtype="float32")
    params = qwen2.Qwen2(config, rngs=nnx.Rngs(0)).params()
    for rows, ms in position_ms(config, params).items():
        print(f"prefill pack of {rows} x {BUDGET}: {ms:.3f} ms a position", flush=True)

    prompts, outputs = rrm_workload(256, (64, 512), 256, config.vocab_size, 0)
    reqs = [engine.Request(p, m, i) for i, (p, m) in enumerate(zip(prompts, outputs))]
    settings = SamplingSettings(0.6, 0, 1.0, (), None, ())

    def run(rows: int) -> float:
        engine.PREFILL_ROWS["cpu"] = rows
        t = time.perf_counter()
        engine.generate(config, settings, params, reqs, seed=0, max_rows=SLOTS)
        return time.perf_counter() - t

    for rows in (1, 8):  # compile every program of both settings
        run(rows)
    walls = {1: [], 8: []}
    for i in range(args.runs):
        for rows in (1, 8) if i % 2 == 0 else (8, 1):
            walls[rows].append(run(rows))
            print(f"warm run, {rows} row(s) a prefill call: {walls[rows][-1]:.1f} s", flush=True)
    ratio = sum(walls[1]) / sum(walls[8])
    print(f"one row a call takes {ratio:.3f}x the time of eight over {args.runs} warm runs each")


if __name__ == "__main__":
    main()
