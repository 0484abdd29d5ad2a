#!/usr/bin/env bash
# The whole GPU check in one command (< 8 minutes on an H100/H200): sampling throughput of the
# r1-distill-qwen-1.5b shape in bfloat16 at batch 1, 64 and 256 against transformers `generate` on the
# same card (issue 3), and the GRPO step phases with update-phase MFU (issue 5).
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
