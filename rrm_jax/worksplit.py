"""Work split over processes: a fixed plan of batches, each process running its share on its own devices.

`generate`, `judge`, `rank` and `eval` cut their items into a batch plan that depends only on the
items and the settings (`plan_batches`: similar lengths together, `batch_size` prompts each), and
seed each batch from (seed, call, batch number) (`batch_seed`). Batch b of round r runs on process
b - r * N: in every round each of the N processes runs one batch on its local devices, then the
round's results are all-gathered so that every process holds them all (rank needs every winner to
build the next round; process 0 writes). Whatever N, and however often the job was interrupted and
resumed, every batch holds the same prompts with the same seed: the results are the one-process ones.

Why per-process shares and not one sampler over the global mesh: a judge that fits on one host
(a 32B model in bfloat16 is 64 GB: tensor-parallel over the 4 chips of a v5p host) decodes with
no cross-host traffic at all, and each host runs its batch to its own end instead of waiting, at
every decode step, for the longest row of a global batch. The hosts meet once per batch, to swap
results and agree on stopping.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import TypeVar

from rrm_jax import distributed
from rrm_jax.resumable import Interrupted

T = TypeVar("T")


def plan_batches(lengths: Sequence[int], sizes: Sequence[int], batch_size: int) -> list[list[int]]:
    """Item indices per batch: items sorted by length (ties by index), then cut into consecutive
    batches of at most `batch_size` prompts, an item's `sizes[i]` prompts always in one batch."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    count = 0
    for i in order:
        if not batches or count + sizes[i] > batch_size:
            batches.append([])
            count = 0
        batches[-1].append(i)
        count += sizes[i]
    return batches


def batch_seed(seed: int, call: int, batch: int) -> int:
    """The sampler seed of one planned batch (31 bits), from SHA-256: the same on every machine."""
    digest = hashlib.sha256(json.dumps([seed, call, batch]).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def run_rounds(
    tasks: Sequence[T],
    run: Callable[[T], object],
    on_round: Callable[[list[tuple[T, object]]], None],
    *,
    stop_requested: Callable[[], bool] | None = None,
) -> None:
    """Run `tasks` (the same list on every process) split over the processes, round by round.

    In each round process p runs `run(tasks[round * N + p])`; its result (JSON-able) is gathered and
    `on_round([(task, result), ...])` is called on every process with the whole round in task order.
    After each round, if `stop_requested()` is true on any process, all raise `Interrupted` together."""
    n, me = distributed.process_count(), distributed.process_index()
    for start in range(0, len(tasks), n):
        mine = start + me
        result = run(tasks[mine]) if mine < len(tasks) else None
        results = distributed.allgather_objects(result)
        on_round([(tasks[start + p], r) for p, r in enumerate(results) if start + p < len(tasks)])
        if distributed.any_process(bool(stop_requested and stop_requested())):
            raise Interrupted
