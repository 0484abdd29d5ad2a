"""Peak host memory and wall time of `rrm-jax convert` in both directions.

    .venv/bin/python benchmarks/convert_memory.py [--preset r1-distill-qwen-1.5b] [--shard-size 1GB]

Writes a random bfloat16 HF folder with the preset's shapes as sharded safetensors (itself streamed,
block by block) in a temp folder under /tmp, then runs hf-to-orbax and orbax-to-hf, each in its own
subprocess that reports its own peak RSS (VmHWM). The baseline is a child that imports the conversion
code and starts the JAX backend, then exits. The target: peak RSS - baseline stays under
the largest tensor + 0.5 GB. Finally checks the exported tensors are bit-identical to the input.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rrm_jax.model import hf  # noqa: E402
from rrm_jax.model.config import preset  # noqa: E402

# Each child reports its own VmHWM (peak RSS of its address space after exec). os.wait4's ru_maxrss
# would also count the pages the child inherited from this (large) parent before exec.
CHILD = """
import sys
{body}
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print("PEAK_RSS_KIB", int(line.split()[1]))
"""
BASELINE = "import jax, rrm_jax.model.convert\njax.devices()"
CONVERT = "from rrm_jax.cli import main\nrc = main({argv!r})\nassert rc == 0, rc"


def run_child(body: str) -> dict:
    """Run python code in a child process; its wall time and peak RSS (bytes)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD.format(body=body)], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    peaks = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS_KIB")]
    if proc.returncode != 0 or not peaks:
        raise SystemExit(f"child failed:\n{body}\n{proc.stderr[-3000:]}")
    return {"wall_s": round(wall, 1), "peak_rss_bytes": int(peaks[0]) * 1024}


def write_random_hf(folder: Path, config, shard_size: int) -> None:
    """A random bf16 HF folder, generated and written one block at a time."""
    import ml_dtypes

    def region(path, index):
        shape = hf.region_shape(index, hf.param_shapes(config)[path])
        seed = zlib.crc32(repr((path, hf.normalize_index(index, hf.param_shapes(config)[path]))).encode())
        rng = np.random.default_rng(seed)
        return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(ml_dtypes.bfloat16)

    folder.mkdir(parents=True)
    hf.write_hf_folder(folder, config, region, dtype=np.dtype(ml_dtypes.bfloat16), max_shard_size=shard_size)


def tensors_identical(a: Path, b: Path) -> bool:
    """Every tensor of HF folder `a` is in `b` with identical dtype, shape and bytes (read one at a time)."""
    fa, fb = hf.SafetensorsFolder(a), hf.SafetensorsFolder(b)
    try:
        for name, entry in fa.entries.items():
            other = fb.entries.get(name)
            if other is None or other.dtype != entry.dtype or other.shape != entry.shape:
                return False
            if not np.array_equal(fa.read(name).view(np.uint8), fb.read(name).view(np.uint8)):
                return False
        return set(fa.entries) == set(fb.entries)
    finally:
        fa.close()
        fb.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="r1-distill-qwen-1.5b")
    parser.add_argument("--shard-size", default="1GB", help="safetensors shard size of the input folder")
    parser.add_argument("--workdir", default="/tmp", help="where the temp folder goes")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = parser.parse_args()

    config = preset(args.preset).replace(param_dtype="bfloat16", dtype="bfloat16")
    tensors = hf.hf_tensors(config)
    largest = max(math.prod(t.shape) for t in tensors) * 2  # bytes, bf16 (HF tensors: one layer each)
    total = sum(math.prod(t.shape) for t in tensors) * 2
    work = Path(tempfile.mkdtemp(prefix="rrm-convert-bench-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        write_random_hf(work / "hf", config, hf.parse_size(args.shard_size))
        make_s = time.perf_counter() - t0
        bare = run_child("pass")
        baseline = run_child(BASELINE)
        to_orbax = run_child(
            CONVERT.format(argv=["convert", "hf-to-orbax", "--hf", str(work / "hf"), "--out", str(work / "ckpt")])
        )
        to_hf = run_child(
            CONVERT.format(argv=["convert", "orbax-to-hf", "--ckpt", str(work / "ckpt"), "--out", str(work / "out")])
        )
        identical = tensors_identical(work / "hf", work / "out")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    limit = largest + 500 * 10**6
    result = {
        "preset": args.preset,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        "input": f"{len(tensors)} bf16 tensors, {total / 1e9:.2f} GB, shards of {args.shard_size}",
        "make_input_s": round(make_s, 1),
        "largest_tensor_bytes": largest,
        "limit_above_baseline_bytes": limit,
        "bare_python_rss_bytes": bare["peak_rss_bytes"],
        "baseline_rss_bytes": baseline["peak_rss_bytes"],
        "round_trip_bit_identical": identical,
    }
    for name, run in (("hf_to_orbax", to_orbax), ("orbax_to_hf", to_hf)):
        above = run["peak_rss_bytes"] - baseline["peak_rss_bytes"]
        result[name] = {**run, "above_baseline_bytes": above, "within_limit": above < limit}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
