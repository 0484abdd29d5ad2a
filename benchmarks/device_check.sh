#!/usr/bin/env bash
# The whole GPU check in one command (about 10 minutes on an H100/H200): sampling throughput of the
# r1-distill-qwen-1.5b shape in bfloat16 at batch 1, 64 and 256 against transformers `generate` on the
# same card (issue 3), the GRPO step phases with update-phase MFU (issue 5), and the engine on the
# RRM-shaped ragged workload with a cap of 8192 new tokens against static batching and transformers (issue 10).
# Uses the machine's own jax/flax/optax/orbax/transformers/torch; grain and datasets stay off the import path.
# Results go to $OUT (or benchmarks/out): JSON per benchmark plus the logs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
$PY -c "import jax, flax, optax, orbax.checkpoint, transformers, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"

# smoke test: the whole path on a tiny shape, seconds
timeout 60 $PY -m rrm_jax.cli bench sample --preset tiny --batch 2 --prompt-len 16 --gen-len 8 --compare-hf 2>&1 | tail -2

# torch shares the card with JAX in the sampling run: leave it room.
XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout 320 $PY -m rrm_jax.cli bench sample --preset r1-distill-qwen-1.5b \
  --dtype bfloat16 --batch 1 64 256 --prompt-len 512 --gen-len 256 --compare-hf \
  --json "$OUT/sample_1.5b.json" 2>&1 | tee "$OUT/sample.log"

XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout 150 $PY -m rrm_jax.cli bench train --preset r1-distill-qwen-1.5b \
  --dtype bfloat16 --prompts 8 --samples 4 --prompt-len 512 --gen-len 512 --micro-batches 4 \
  --json "$OUT/train_1.5b.json" 2>&1 | tee "$OUT/train.log"

# Issue 10: ragged RRM-shaped requests (prompts 64-1024, outputs log-normal with median 1024, ~3% at 8192).
# (a) the engine against static batching, 128 requests through 64 slots;
XLA_PYTHON_CLIENT_MEM_FRACTION=0.8 timeout 240 $PY -m rrm_jax.cli bench sample --preset r1-distill-qwen-1.5b \
  --dtype bfloat16 --workload rrm --requests 128 --slots 64 --prompt-range 64 1024 --max-new-tokens 8192 \
  --json "$OUT/rrm_static_1.5b.json" 2>&1 | tee "$OUT/rrm_static.log"
# (b) against transformers: one static batch of 16 runs to its longest request (up to 8192 steps),
# so transformers gets 16 requests; the engine decodes the same 16.
XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 timeout 300 $PY -m rrm_jax.cli bench sample --preset r1-distill-qwen-1.5b \
  --dtype bfloat16 --workload rrm --requests 16 --slots 16 --prompt-range 64 1024 --max-new-tokens 8192 \
  --no-static --compare-hf --json "$OUT/rrm_hf_1.5b.json" 2>&1 | tee "$OUT/rrm_hf.log"
