"""Concurrent rows of the paged engine against the contiguous one in the same KV bytes, on the rrm workload
at the RRM cap (8,192 new tokens), on this CPU: the count the page pool buys does not depend on the
hardware, only on the workload's lengths, so a model small enough for a CPU measures it. The model is the
`tiny` preset narrowed and given a 16k context (no preset that fits a CPU has room for 8,192 new tokens).
Throughput on a CPU is not the point (the paged path is the accelerator one: BENCHMARKS.md).

    .venv/bin/python benchmarks/paged_concurrency.py [--requests 192] [--slots 16] [--paged-rows 128]
        [--cap 8192] [--json out.json]
"""

import argparse
import json

from flax import nnx

from rrm_jax import bench_rrm
from rrm_jax.model import qwen2
from rrm_jax.model.config import preset


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=192)
    ap.add_argument("--slots", type=int, default=16, help="the contiguous engine's slots: the KV budget")
    ap.add_argument("--paged-rows", type=int, default=128, help="the paged engine's slots in that budget")
    ap.add_argument("--cap", type=int, default=8192)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    config = preset("tiny").replace(
        max_position_embeddings=16384, hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1
    )
    model = qwen2.Qwen2(config, rngs=nnx.Rngs(0))
    row = bench_rrm.bench_rrm(
        model,
        n=a.requests,
        prompt_range=(64, 512),
        cap=a.cap,
        slots=a.slots,
        hf_methods=(),
        static=False,
        paged_rows=a.paged_rows,
    )
    print(json.dumps(row))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
