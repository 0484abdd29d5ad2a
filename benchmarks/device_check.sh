#!/usr/bin/env bash
# The GPU check in one command, sized for a 15-minute lease (the machine's start takes 1-2 of them): at most
# 460 s of command timeouts (+ 2 s each to kill a command that ignores SIGTERM), so under 8 minutes from the
# first line to the last on one H100/H200. Every step runs under `timeout`, prints its figures as it measures
# them and writes JSON under $OUT (default benchmarks/out); steps.jsonl records each step's exit status and
# seconds (124: it ran out of time), NAME.compile.json its process's compile seconds and cache hits.
# The r1-distill-qwen-1.5b shape with random weights, bfloat16. Budget per step (timeout, seconds):
#    10  nvidia-smi
#    20  versions, and the bench's import path without grain / datasets (the card has neither)
#    95  fixed length: prompt 512, gen 256, batch 1 / 64 / 256 (decode step, MBU; no transformers: no time)
#   150  rrm workload, cap 8192: 256 requests through 128 slots (useful tokens/s, achieved GB/s), then the
#        paged engine with 512 slots in the same KV bytes (rows at once, preemptions, tokens/s: issue 20)
#    65  compile, cold: a judging-shaped call (32 prompts of 64-1024 tokens) with a fresh compilation cache
#    35  compile, warm: the same command again on that cache (its backend compile seconds, cache hits)
#    85  rrm workload, cap 1024: 64 requests through 32 slots, engine vs static batching vs transformers
#        generate_batch (continuous batching; transformers' static generate does not fit the lease here)
#   ---
#   460
# Not here any more (no time in a lease): transformers static `generate` at batch 1/64/256 (measured before,
# BENCHMARKS.md) and the GRPO step phases of `bench train` (issue 5).
# Uses the machine's own jax / flax / transformers / torch (jax 0.11.2, flax 0.12.10, transformers 5.17 and
# torch 2.11 on the lent H200), not the project's pins. Each bench command gets a fresh compilation cache,
# so its compile seconds are those of a first run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
CACHES=$(mktemp -d)
trap 'rm -rf "$CACHES"' EXIT
START=$SECONDS
BENCH=(-m rrm_jax.cli bench sample --preset r1-distill-qwen-1.5b --dtype bfloat16)

# step NAME TIMEOUT_S CACHE_DIR COMMAND...: run under timeout, log to $OUT/NAME.log, record rc and seconds.
step() {
  local name=$1 limit=$2 cache=$3
  shift 3
  echo "=== $name (timeout ${limit} s; $((SECONDS - START)) s into the check)"
  local t=$SECONDS
  RRM_JAX_COMPILE_CACHE=$cache RRM_JAX_COMPILE_REPORT=1 timeout -k 2 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=$?
  [ "$rc" = 124 ] && echo "=== $name: did not finish within $limit s"
  printf '{"step": "%s", "rc": %d, "seconds": %d, "timeout_s": %d}\n' "$name" "$rc" $((SECONDS - t)) "$limit" \
    | tee -a "$OUT/steps.jsonl"
  # the process's own compile totals (rrm_jax/compile_cache.py: backend compile seconds, cache hits), as JSON
  local report
  report=$(grep -h '^rrm-jax compile-report ' "$OUT/$name.log" | tail -1)
  [ -n "$report" ] && echo "${report#rrm-jax compile-report }" > "$OUT/$name.compile.json"
  return 0
}

timeout -k 2 10 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
step versions 20 off $PY -c "
import sys
import jax, flax, transformers, torch
from rrm_jax import cli, bench, bench_rrm, engine
cli.build_parser(['bench', 'sample'])
off = [m for m in ('grain', 'datasets') if m in sys.modules]
print('jax', jax.__version__, 'flax', flax.__version__, 'transformers', transformers.__version__, 'torch',
      torch.__version__, jax.devices(), '| grain/datasets imported by the bench path:', off or 'none')
sys.exit(1 if off else 0)"

# decode step at three batch sizes, MBU against the bandwidth the bench measures
XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 step fixed 95 "$CACHES/fixed" $PY "${BENCH[@]}" --batch 1 64 256 \
  --prompt-len 512 --gen-len 256 --json "$OUT/fixed_1.5b.json"

# RRM-shaped ragged requests (prompts 64-1024, outputs log-normal with median 1024, ~2% at the cap; ~396k
# tokens), the contiguous engine's 128 slots (34 GB of KV), then the paged one with 512 slots in those bytes
XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 step rrm_8192 150 "$CACHES/rrm_8192" $PY "${BENCH[@]}" --workload rrm \
  --requests 256 --slots 128 --paged-rows 512 --prompt-range 64 1024 --max-new-tokens 8192 --no-static \
  --json "$OUT/rrm_8192_1.5b.json"

# the same command twice on one fresh cache: the second run's compile seconds are what a user pays again
COMPILE=(--workload rrm --requests 32 --slots 32 --prompt-range 64 1024 --max-new-tokens 256 --no-static)
XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 step compile_cold 65 "$CACHES/compile" $PY "${BENCH[@]}" "${COMPILE[@]}" \
  --json "$OUT/compile_cold_1.5b.json"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 step compile_warm 35 "$CACHES/compile" $PY "${BENCH[@]}" "${COMPILE[@]}" \
  --json "$OUT/compile_warm_1.5b.json"

# ~13.4k tokens; torch shares the card with JAX here: JAX takes 45%, transformers' paged cache its share of the rest
XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 step rrm_1024_hf 85 "$CACHES/rrm_1024" $PY "${BENCH[@]}" --workload rrm \
  --requests 64 --slots 32 --prompt-range 64 1024 --max-new-tokens 1024 --compare-hf generate_batch \
  --json "$OUT/rrm_1024_hf_1.5b.json"

echo "=== device check done in $((SECONDS - START)) s"
