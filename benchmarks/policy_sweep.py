"""`make demo-policy` over seeds: how fast the toy judge alone teaches a policy to avoid the banned letter.

Each seed is its own `rrm-jax train --config rrm_jax/configs/toy_policy.yaml` process, run to the
config's max_steps, judged by the same toy judge (--judge, the run folder of `make demo`). Recorded
per seed from metrics.jsonl: heldout_banned_rate at step 0 (after the format warm-up) and at the end,
the first evaluation at or below --target (its step; the trainer's `elapsed` at it, from the start of
`train`, warm-up and compilation included; and the GRPO time, from the step-0 row to it), the largest
rate at or after that point, the fewest answers made of lowercase letters only (heldout_letter_answers) at any
evaluation, the median step and judge times, and the load averages around the run.

    .venv/bin/python benchmarks/policy_sweep.py --judge runs/toy --seeds 0 1 2 --out benchmarks/results/policy_sweep
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from toy_sweep import loadavg  # benchmarks/ is on the path when this script runs

CONFIG = Path(__file__).resolve().parents[1] / "rrm_jax" / "configs" / "toy_policy.yaml"
KEY = "heldout_banned_rate"
LETTERS = "heldout_letter_answers"


def run_seed(seed: int, judge: str, run_dir: Path, target: float, overrides: list[str]) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    exe = Path(sys.executable).parent / "rrm-jax"
    cmd = [
        str(exe),
        "train",
        "--no-progress",
        "--config",
        str(CONFIG),
        "--output-dir",
        str(run_dir),
        f"reward.judge={judge}",
        f"seed={seed}",
        *overrides,
    ]
    load_before = loadavg()
    t0 = time.perf_counter()
    with open(run_dir.parent / f"seed{seed}.log", "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if KEY in r]
    steps = [r for r in rows if "step_time" in r]
    reached = next((r for r in evals if r[KEY] <= target), None)
    return {
        "seed": seed,
        "exit": code,
        "command": " ".join(["rrm-jax", *cmd[1:]]),
        "start_rate": evals[0][KEY],
        "final_rate": evals[-1][KEY],
        "final_step": evals[-1]["step"],
        "reached": reached is not None,
        "step": reached["step"] if reached else None,
        "elapsed_s": reached["elapsed"] if reached else None,
        "grpo_s": reached["elapsed"] - evals[0]["elapsed"] if reached else None,
        "max_rate_after": max(r[KEY] for r in evals if r["step"] >= reached["step"]) if reached else None,
        "final_letter_answers": evals[-1][LETTERS],
        "min_letter_answers": min(r[LETTERS] for r in evals),
        "median_step_time_s": statistics.median(r["step_time"] for r in steps),
        "median_judge_time_s": statistics.median(r["judge_time"] for r in steps),
        "wall_s": wall,
        "load_before": load_before,
        "load_after": loadavg(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--judge", default="runs/toy")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--target", type=float, default=0.02)
    parser.add_argument("--out", default="benchmarks/results/policy_sweep")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in args.seeds:
        r = run_seed(seed, args.judge, out / f"seed{seed}", args.target, args.overrides)
        results.append(r)
        print(json.dumps(r), flush=True)
    reached = [r for r in results if r["reached"]]
    summary = {
        "seeds": args.seeds,
        "reached": len(reached),
        "target": args.target,
        "worst_elapsed_s": max((r["elapsed_s"] for r in reached), default=None),
        "worst_grpo_s": max((r["grpo_s"] for r in reached), default=None),
        "worst_final_rate": max(r["final_rate"] for r in results),
        "worst_letter_answers": min(r["min_letter_answers"] for r in results),
    }
    print(json.dumps(summary))
    (out / "summary.json").write_text(json.dumps({"runs": results, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
