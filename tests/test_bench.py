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
    args = [
        "bench",
        "sample",
        "--workload",
        "rrm",
        "--preset",
        "tiny",
        "--requests",
        "3",
        "--slots",
        "2",
        "--prompt-range",
        "8",
        "8",
        "--max-new-tokens",
        "4",
        "--no-static",
        "--compare-hf",
    ]  # both methods
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(
        [sys.executable, "-c", RUN_WITHOUT_GRAIN, *args], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    err = done.stderr
    assert "[bench rrm] transformers generate (length-sorted static batches of 2):" in err
    assert "[bench rrm] transformers generate_batch (continuous batching):" in err
    achieved = [l for l in err.splitlines() if l.startswith("[bench rrm] engine achieved ")]
    assert len(achieved) == 1 and "% of the measured " in achieved[0], err
    row = dict(kv.split("=", 1) for kv in done.stdout.split())
    for key in (
        "engine_achieved_GBps",
        "engine_bandwidth_fraction",
        "hf_tokens_per_s",
        "hf_batch_tokens_per_s",
        "engine_vs_hf_batch",
    ):
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


def test_compare_hf_methods_that_do_not_apply_are_one_line_and_exit_2(capsys):
    from rrm_jax import cli

    for extra, message in (
        (["--compare-hf", "generate_batch"], "--workload fixed takes generate"),
        (["--workload", "cache", "--compare-hf"], "no transformers baseline"),
        (["--compare-hf", "vllm"], "invalid choice"),
    ):
        try:
            code = cli.main(["bench", "sample", "--preset", "tiny", *extra])
        except SystemExit as e:  # argparse's own errors
            code = e.code
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err and message in err, err


def test_device_check_fits_a_15_minute_lease():
    """benchmarks/device_check.sh: every command under `timeout`, the timeouts summing to at most 460 s (the
    machine's start and a rerun's margin take the rest of the lease), the budget in its header kept true."""
    import re

    text = (ROOT / "benchmarks" / "device_check.sh").read_text()
    code = [l for l in text.splitlines() if l.strip() and not l.lstrip().startswith("#")]
    steps = [int(m.group(1)) for l in code if (m := re.search(r"\bstep \w+ (\d+) ", l))]
    direct = [int(m.group(1)) for l in code if (m := re.match(r"timeout -k \d+ (\d+) ", l))]
    assert len(steps) >= 6 and sum(steps) + sum(direct) <= 460
    header = [int(m.group(1)) for l in text.splitlines() if (m := re.match(r"#\s+(\d+)(?:\s{2}\S.*)?$", l))]
    assert sorted(header[:-1]) == sorted(steps + direct) and header[-1] == sum(steps + direct)
    for l in code:  # python and nvidia-smi only ever run under a timeout
        if re.search(r"\$PY\b|nvidia-smi", l):
            assert re.search(r"\bstep \w+ \d+ |^timeout ", l), l


def test_paged_rows_run_the_paged_engine_in_the_contiguous_caches_bytes():
    """--paged-rows: the paged engine with 4x the slots in the pages the contiguous cache's bytes make
    holds more rows at once than the contiguous engine's slots, and reports its pool."""
    from flax import nnx

    from rrm_jax.bench_rrm import bench_rrm
    from rrm_jax.model import qwen2

    model = qwen2.Qwen2(preset("tiny").replace(max_position_embeddings=2048), rngs=nnx.Rngs(0))
    row = bench_rrm(model, n=16, prompt_range=(8, 24), cap=512, slots=2, hf_methods=(), static=False, paged_rows=8)
    capacity = int(row["kv_capacity_per_slot"])
    assert row["paged_pool_pages"] == 2 * capacity // 64 and row["paged_page_size"] == 64
    assert row["engine_peak_concurrent_rows"] == 2 and row["engine_pool_pages"] == 0
    assert row["paged_peak_concurrent_rows"] > 2 and row["paged_rows_while_waiting"] > row["engine_rows_while_waiting"]
    assert row["paged_peak_pages_in_use"] <= row["paged_pool_pages"] - 1  # the null page is never handed out
    assert (row["paged_recomputed_tokens"] > 0) == (row["paged_preemptions"] > 0)
