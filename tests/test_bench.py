"""`rrm-jax bench sample --workload rrm`: its figures and what it imports."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from rrm_jax.bench_rrm import decode_bytes
from rrm_jax.model.config import preset

ROOT = Path(__file__).resolve().parents[1]

# grain and datasets are off the import path of the GPU card's environment: the bench must not need them
RUN_WITHOUT_GRAIN = """
import sys
sys.modules["grain"] = sys.modules["datasets"] = None  # any import of them raises ImportError
from rrm_jax import cli
code = cli.main(sys.argv[1:])
assert not any(m.split(".")[0] in ("grain", "datasets") for m in sys.modules if sys.modules[m] is not None)
sys.exit(code)
"""


def test_rrm_bench_prints_achieved_bandwidth_and_both_transformers_methods_without_grain():
    args = ["bench", "sample", "--workload", "rrm", "--preset", "tiny", "--requests", "3", "--slots", "2",
            "--prompt-range", "8", "8", "--max-new-tokens", "4", "--no-static", "--compare-hf"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", RUN_WITHOUT_GRAIN, *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    err = done.stderr
    assert "[bench rrm] transformers generate (static batches of 2):" in err
    assert "[bench rrm] transformers generate_batch (continuous batching):" in err
    achieved = [l for l in err.splitlines() if l.startswith("[bench rrm] engine achieved ")]
    assert len(achieved) == 1 and "% of the measured " in achieved[0], err
    row = dict(kv.split("=", 1) for kv in done.stdout.split())
    for key in ("engine_achieved_GBps", "engine_bandwidth_fraction", "hf_tokens_per_s", "hf_batch_tokens_per_s",
                "engine_vs_hf_batch"):
        assert float(row[key]) > 0, key
    # the printed figure is the bytes over the time without compiling
    gb = float(row["decode_weight_GB"]) + float(row["decode_kv_GB"])
    assert np.isclose(float(row["engine_achieved_GBps"]), gb / float(row["engine_run_s"]), rtol=1e-3)


def test_decode_bytes_counts_the_weights_per_step_and_the_kv_each_live_row_holds():
    c = preset("tiny")
    prompts, outputs = [5, 9], [3, 1]
    weights, kv = decode_bytes(c, prompts, outputs, decode_steps=3)
    itemsize = np.dtype(c.param_dtype).itemsize
    untied = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size * itemsize
    assert weights == 3 * (c.num_params * itemsize - untied)
    held = sum(P + t for P, n in zip(prompts, outputs) for t in range(n))  # 5 + 6 + 7 + 9
    assert held == 27
    assert kv == held * 2 * c.num_layers * c.num_kv_heads * c.head_dim * np.dtype(c.dtype).itemsize
