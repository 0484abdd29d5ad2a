"""Time to 90% held-out accuracy of the embedded default (`rrm-jax train`, i.e. `make demo`) over seeds.

Seeds run one at a time, each as its own `rrm-jax train` process. A run is watched through its
metrics.jsonl and sent SIGTERM (the trainer saves that step and exits 0) once a held-out evaluation
reads >= --target, or when --limit seconds have passed since the process started. Recorded per seed:
the step and time of the first held-out accuracy >= target, both as the trainer's `elapsed` (from the
start of `train`, warm-up and compilation included) and as wall time from the process launch
(Python and JAX start-up included: what a user waits), the accuracy reached, the machine's load
averages (/proc/loadavg) before and after, and whether the guard fired (collapse / rollback rows).

    .venv/bin/python benchmarks/toy_sweep.py --seeds 0 1 2 3 4 5 6 7 8 9 --out benchmarks/results/toy_sweep
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return rows


def run_seed(seed: int, run_dir: Path, target: float, limit: float, overrides: list[str]) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    exe = Path(sys.executable).parent / "rrm-jax"
    cmd = [str(exe), "train", "--no-progress", "--output-dir", str(run_dir), f"seed={seed}", *overrides]
    load_before = loadavg()
    t0 = time.perf_counter()
    log = open(run_dir.parent / f"seed{seed}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    reached, stopped_by = None, None
    while proc.poll() is None:
        time.sleep(1.0)
        rows = read_rows(run_dir / "metrics.jsonl")
        reached = next((r for r in rows if r.get("eval_accuracy", 0) >= target), None)
        if reached is not None or time.perf_counter() - t0 > limit:
            stopped_by = "target" if reached is not None else "limit"
            wall_at_stop = time.perf_counter() - t0
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            break
    wall = time.perf_counter() - t0
    log.close()
    rows = read_rows(run_dir / "metrics.jsonl")
    reached = next((r for r in rows if r.get("eval_accuracy", 0) >= target), None)
    evals = [r for r in rows if "eval_accuracy" in r]
    steps = [r for r in rows if "step_time" in r]
    result = {
        "seed": seed,
        "command": " ".join(["rrm-jax", *cmd[1:]]),
        "reached": reached is not None,
        "step": reached["step"] if reached else None,
        "accuracy": reached["eval_accuracy"]
        if reached
        else (max(r["eval_accuracy"] for r in evals) if evals else None),
        "elapsed_s": reached["elapsed"] if reached else None,  # the trainer's clock
        # wall from launch when the row was read (polled every second): an upper bound of what a user waits
        "wall_at_stop_s": wall_at_stop if stopped_by else wall,
        "stopped_by": stopped_by or f"exit {proc.returncode}",
        "steps_run": len(steps),
        "median_step_time_s": statistics.median(r["step_time"] for r in steps) if steps else None,
        "warmup_done_s": next((r["elapsed"] for r in rows if r.get("step") == 0), None),
        "collapse_events": [r for r in rows if "collapse" in r],
        "max_truncated_fraction": max((r["truncated_fraction"] for r in steps), default=None),
        "load_before": load_before,
        "load_after": loadavg(),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "collapse_events"}), flush=True)
    return result


def summary_markdown(results: list[dict], target: float, limit: float) -> str:
    lines = [
        f"| seed | first held-out >= {target:.0%} | trainer elapsed | wall from launch (upper bound) | "
        f"median step | load avg before -> after (1/5/15 min) | guard |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        where = f"step {r['step']} ({r['accuracy']:.1%})" if r["reached"] else f"not reached (best {r['accuracy']:.1%})"
        guard = ", ".join(f"{e['action']} at {e['step']}" for e in r["collapse_events"]) or "-"
        lines.append(
            f"| {r['seed']} | {where} | {r['elapsed_s']:.0f} s | {r['wall_at_stop_s']:.0f} s | "
            f"{r['median_step_time_s']:.2f} s | {'/'.join(map(str, r['load_before']))} -> "
            f"{'/'.join(map(str, r['load_after']))} | {guard} |"
            if r["reached"]
            else f"| {r['seed']} | {where} | - | {r['wall_at_stop_s']:.0f} s (limit {limit:.0f} s) | "
            f"{r['median_step_time_s'] or 0:.2f} s | {'/'.join(map(str, r['load_before']))} -> "
            f"{'/'.join(map(str, r['load_after']))} | {guard} |"
        )
    done = [r for r in results if r["reached"]]
    if done:
        times = sorted(r["elapsed_s"] for r in done)
        walls = sorted(r["wall_at_stop_s"] for r in done)
        lines.append("")
        lines.append(
            f"{len(done)} of {len(results)} seeds reached {target:.0%}. Trainer elapsed: median "
            f"{statistics.median(times):.0f} s, worst {times[-1]:.0f} s; wall from launch: median "
            f"{statistics.median(walls):.0f} s, worst {walls[-1]:.0f} s."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--limit", type=float, default=600.0, help="seconds per seed from launch")
    parser.add_argument("--runs", default="runs/sweep", help="run folders (replaced)")
    parser.add_argument("--out", default="benchmarks/results/toy_sweep", help="writes OUT.json and OUT.md")
    parser.add_argument("overrides", nargs="*", help="config overrides passed to every run (default: none)")
    args = parser.parse_args()
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in args.seeds:
        results.append(run_seed(seed, runs / f"s{seed}", args.target, args.limit, args.overrides))
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "target": args.target,
            "limit_s": args.limit,
            "overrides": args.overrides,
            "cpus": os.cpu_count(),
            "results": results,
        }
        out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
        out.with_suffix(".md").write_text(summary_markdown(results, args.target, args.limit))
    print(summary_markdown(results, args.target, args.limit))


if __name__ == "__main__":
    main()
