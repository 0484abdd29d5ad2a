"""`rrm-jax bench sample --workload rrm`: throughput on requests shaped like RRM judging.

The request set is seeded: prompt lengths uniform over a range, output lengths log-normal with a median of
cap / 8 and sigma 1.1 (about 3% reach the cap), clipped to [1, cap]. Every request generates exactly its
drawn length (EOS ignored), so the work is fixed and the methods compare on the same tokens:

1. the engine (`rrm_jax.engine`): `slots` rows at once, each request with its own limit;
2. static batching (`rrm_jax.static_sampler`, the sampler before the engine): batches of `slots`
   requests in input order, the cache sized for the cap, each batch decoding until its longest row;
3. transformers `generate` (torch) in length-sorted static batches of the same size, each batch run to its longest
   request (left-padded, min_new_tokens = max_new_tokens = that length);
4. transformers' continuous batching (paged attention), every request submitted at once with its own
   max_new_tokens to the manager `generate_batch` runs, sized by the same workload hints;
5. with `paged_rows`, the engine with a paged KV cache (the "layers" path) of `paged_rows` slots in the
   bytes the contiguous cache of `slots` slots takes: the pages, not the cap, bound the rows decoding at
   once, and the run reports how many it reached (peak and mean over the decode steps) and how many rows
   it preempted.

Useful tokens/s = the sum of the drawn lengths / wall time. Compilation is part of a JAX method's wall
time (a user pays it); the seconds spent compiling are reported beside it. transformers' warm-up runs (two
short requests) are outside its timings.

The engine's achieved bandwidth: the bytes its decode steps must read (the weights once a step, plus at each
step the KV positions every live row holds) over its wall time less compilation (tracing, lowering and
XLA compiling). Prefill and host work stay in that time, so the figure is a lower bound on the decode
steps' own rate; it is printed against the bandwidth the bench measured.
"""

from __future__ import annotations

import sys
import tempfile
import time

import jax
import numpy as np

from rrm_jax import engine, static_sampler
from rrm_jax.pages import pages_in_budget
from rrm_jax.sampling import SamplingSettings

SIGMA = 1.1  # log-normal spread of output lengths: P(length >= 8 * median) = 3%


def rrm_workload(n: int, prompt_range: tuple[int, int], cap: int, vocab_size: int, seed: int = 0):
    """-> (prompts: n lists of token ids, output lengths: n ints in [1, cap])."""
    rng = np.random.default_rng(seed)
    prompt_lens = rng.integers(prompt_range[0], prompt_range[1] + 1, n)
    prompts = [rng.integers(3, vocab_size, m).tolist() for m in prompt_lens]
    outputs = np.clip(np.rint(rng.lognormal(np.log(cap / 8), SIGMA, n)), 1, cap).astype(int)
    return prompts, outputs.tolist()


_TRACE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration")


class _CompileClock:
    """Seconds JAX spends compiling while active (from jax.monitoring's backend-compile events), and apart
    from them the seconds spent tracing and lowering to XLA."""

    def __init__(self):
        self.seconds, self.trace_seconds, self.active = 0.0, 0.0, False
        jax.monitoring.register_event_duration_secs_listener(self._record)

    def _record(self, event, duration, **_):
        if self.active and event == "/jax/core/compile/backend_compile_duration":
            self.seconds += duration
        elif self.active and event in _TRACE_EVENTS:
            self.trace_seconds += duration

    def run(self, fn):
        self.seconds, self.trace_seconds, self.active = 0.0, 0.0, True
        t = time.perf_counter()
        try:
            out = fn()
        finally:
            self.active = False
        return out, time.perf_counter() - t, self.seconds


def decode_bytes(config, prompt_lens, outputs, decode_steps: int) -> tuple[float, float]:
    """-> (weight bytes, KV bytes) the engine's decode steps must read for this work: the weights once a
    step, and at each step the positions every live row holds: a request of prompt length P generating n
    tokens holds P + t positions at its t-th step, sum over t < n = n P + n (n - 1) / 2."""
    from rrm_jax.bench import decode_weight_bytes

    P, n = np.asarray(prompt_lens, np.float64), np.asarray(outputs, np.float64)
    positions = float(np.sum(n * P + n * (n - 1) / 2))
    return float(decode_weight_bytes(config)) * decode_steps, positions * config.kv_bytes_per_token


def _paging_figures(prefix: str, stats: engine.EngineStats) -> dict:
    """The run's rows at once and its page pool's figures (zeros for a contiguous cache)."""
    return {
        f"{prefix}_peak_concurrent_rows": stats.peak_concurrent_rows,
        f"{prefix}_mean_concurrent_rows": stats.live_row_steps / max(stats.decode_steps, 1),
        f"{prefix}_rows_while_waiting": stats.rows_while_waiting,
        f"{prefix}_page_size": stats.page_size,
        f"{prefix}_pool_pages": stats.pool_pages,
        f"{prefix}_peak_pages_in_use": stats.peak_pages_in_use,
        f"{prefix}_preemptions": stats.preemptions,
    }


def _progress(phase: str, wall: float, useful: int, compile_s: float | None = None):
    """One line per finished phase on stderr, so a long run shows its figures as it goes."""
    compiling = f" ({compile_s:.1f} s of it compiling)" if compile_s is not None else ""
    print(
        f"[bench rrm] {phase}: {wall:.1f} s{compiling}, {useful / wall:.1f} useful tokens/s",
        file=sys.stderr,
        flush=True,
    )


def _engine_run(model, settings, prompts, outputs, slots, seed, prefill_tokens=None, **paging):
    stats = engine.EngineStats()
    reqs = [engine.Request(p, m, i) for i, (p, m) in enumerate(zip(prompts, outputs))]
    results = engine.generate(
        model.config,
        settings,
        model.params(),
        reqs,
        seed=seed,
        max_rows=slots,
        stats=stats,
        prefill_tokens=prefill_tokens,
        **paging,
    )
    assert [len(r.output_ids) for r in results] == outputs
    return stats


def _static_run(model, settings, prompts, outputs, slots, cap, seed):
    steps = 0
    for start in range(0, len(prompts), slots):
        batch, limits = prompts[start : start + slots], outputs[start : start + slots]
        results = static_sampler.sample_batch(
            model.config, settings, model.params(), batch, cap, limits=limits, first_index=start, seed=seed
        )
        assert [len(r.output_ids) for r in results] == limits
        steps += max(limits)
    return steps


def _hf_run(hf, prompts, outputs, slots, temperature):
    import torch

    device = next(hf.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # length-sorted batches: least padding
    prompts, outputs = [prompts[i] for i in order], [outputs[i] for i in order]
    for start in range(0, len(prompts), slots):
        batch, longest = prompts[start : start + slots], max(outputs[start : start + slots])
        width = max(len(p) for p in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(batch):  # left padding, as transformers expects for batched generation
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        with torch.inference_mode():
            out = hf.generate(
                ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=longest,
                min_new_tokens=longest,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                pad_token_id=0,
            )
        assert out.shape[1] == width + longest
    if device.type == "cuda":
        torch.cuda.synchronize()


def _hf_batch_run(hf, prompts, outputs, temperature, seed: int = 0) -> float:
    """transformers' continuous batching on every request at once, each with its own max_new_tokens and EOS
    off: the manager `generate_batch` runs (generate_batch itself takes one max_new_tokens for all), sized
    by the same workload hints it passes. -> the seconds spent setting the manager up (cache allocation,
    warm-up), part of the caller's timing. Runs under no_grad: under inference_mode transformers 5.17 fails.

    On a GPU the paged cache takes transformers' default share of the free memory; on a CPU that default is
    90% of the machine's RAM, so there the cache holds exactly every request at once."""
    import torch
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    gen = GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max(outputs),
        eos_token_id=-1,
        pad_token_id=0,
    )
    hints = WorkloadHints(
        max_prompt_length=max(len(p) for p in prompts), max_generated_length=max(outputs), num_requests=len(prompts)
    )
    cb = ContinuousBatchingConfig(seed=seed)
    if next(hf.parameters()).device.type != "cuda":
        page = getattr(cb, "page_size", None) or cb.block_size  # transformers 5.17 calls it block_size
        cb.num_blocks = sum(-(-(len(p) + m) // page) for p, m in zip(prompts, outputs))
    results = {}
    with torch.no_grad():
        t = time.perf_counter()
        with hf.continuous_batching_context_manager(
            generation_config=gen, block=True, timeout=60, continuous_batching_config=cb, workload_hints=hints
        ) as manager:
            setup_s = time.perf_counter() - t
            for i, (p, m) in enumerate(zip(prompts, outputs)):
                manager.add_request(list(p), request_id=f"r{i}", max_new_tokens=int(m), eos_token_id=-1)
            while len(results) < len(prompts):
                r = manager.get_result(timeout=1)
                if r is not None and r.is_finished():
                    results[r.request_id] = r
                elif r is None and not manager.is_running():
                    raise RuntimeError("transformers' continuous batching thread stopped before the requests finished")
        if next(hf.parameters()).device.type == "cuda":
            torch.cuda.synchronize()
    errors = [r.error for r in results.values() if r.error is not None]
    if errors:
        raise RuntimeError(f"transformers generate_batch failed: {errors[0]}")
    assert [len(results[f"r{i}"].generated_tokens) for i in range(len(prompts))] == list(outputs)
    return setup_s


def bench_rrm(
    model,
    *,
    n: int,
    prompt_range: tuple[int, int],
    cap: int,
    slots: int,
    temperature: float = 0.6,
    seed: int = 0,
    hf_methods=("generate", "generate_batch"),
    static: bool = True,
    ceilings: dict | None = None,
    prefill_tokens: int | None = None,
    paged_rows: int | None = None,
) -> dict:
    c = model.config
    prompts, outputs = rrm_workload(n, prompt_range, cap, c.vocab_size, seed)
    if max(len(p) for p in prompts) + cap > c.max_position_embeddings:
        raise ValueError(
            f"prompts up to {prompt_range[1]} tokens + cap {cap} exceed the context of {c.max_position_embeddings}"
        )
    useful = int(sum(outputs))
    settings = SamplingSettings(float(temperature), 0, 1.0, (), None, ())
    clock = _CompileClock()
    row = {
        "requests": n,
        "prompt_lens": f"{prompt_range[0]}-{prompt_range[1]}",
        "cap": cap,
        "slots": slots,
        "useful_tokens": useful,
        "output_median": float(np.median(outputs)),
        "output_at_cap": float(np.mean(np.asarray(outputs) == cap)),
        "params_M": c.num_params / 1e6,
        "dtype": c.dtype,
    }

    stats, wall, compile_s = clock.run(
        lambda: _engine_run(model, settings, prompts, outputs, slots, seed, prefill_tokens)
    )
    trace_s = clock.trace_seconds
    _progress("engine", wall, useful, compile_s)
    weight_b, kv_b = decode_bytes(c, [len(p) for p in prompts], outputs, stats.decode_steps)
    run_s = max(wall - compile_s - trace_s, 1e-9)  # prefill and host work included: a lower bound on decode's rate
    row.update(
        {
            "engine_trace_s": trace_s,
            "engine_run_s": run_s,
            "engine_tokens_per_s_run": useful / run_s,
            "decode_weight_GB": weight_b / 1e9,
            "decode_kv_GB": kv_b / 1e9,
            "engine_achieved_GBps": (weight_b + kv_b) / run_s / 1e9,
        }
    )
    achieved = (
        f"[bench rrm] engine achieved {(weight_b + kv_b) / run_s / 1e9:.4g} GB/s: {weight_b / 1e9:.4g} GB of "
        f"weights ({stats.decode_steps} decode steps) + {kv_b / 1e9:.4g} GB of the KV its live rows held, "
        f"over its {run_s:.3g} s without compiling (prefill included)"
    )
    if ceilings:
        row["engine_bandwidth_fraction"] = row["engine_achieved_GBps"] / ceilings["memory_bandwidth_GBps"]
        achieved += (
            f" = {100 * row['engine_bandwidth_fraction']:.3g}% of the measured "
            f"{ceilings['memory_bandwidth_GBps']:.4g} GB/s"
        )
    print(achieved, file=sys.stderr, flush=True)
    kv_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * np.dtype(c.dtype).itemsize
    mean_len = float(np.mean([len(p) + m for p, m in zip(prompts, outputs)]))
    row.update(
        {
            "engine_s": wall,
            "engine_compile_s": compile_s,
            "engine_tokens_per_s": useful / wall,
            "engine_occupancy": stats.occupancy,
            "engine_decode_steps": stats.decode_steps,
            "engine_decode_calls": stats.decode_calls,
            "engine_prefill_calls": stats.prefill_calls,
            "engine_compactions": stats.compactions,
            "engine_prefill_tokens": stats.prefill_tokens,
            "engine_path": stats.path,
            "engine_attention": stats.attention,
            "concurrent_sequences": stats.slots,
            "kv_capacity_per_slot": stats.capacity,
            "kv_budget_GB": stats.slots * stats.capacity * kv_token / 1e9,
            # what a paged cache would hold in the same budget, from this workload's mean length (computed)
            "paged_sequences_same_budget": int(stats.slots * stats.capacity / mean_len),
            **_paging_figures("engine", stats),
        }
    )
    if paged_rows:
        # the contiguous cache's bytes (its slots x capacity positions) as pages of the paged engine
        kv_pages = pages_in_budget(stats.slots * stats.capacity * kv_token, engine.PAGE_SIZE, kv_token)
        paging = {"path": "layers", "paged": True, "kv_pages": kv_pages}
        paged, wall, compile_s = clock.run(
            lambda: _engine_run(model, settings, prompts, outputs, paged_rows, seed, prefill_tokens, **paging)
        )
        _progress(f"engine, paged ({paged_rows} rows in the KV budget of {slots} slots)", wall, useful, compile_s)
        figures = _paging_figures("paged", paged)
        print(
            f"[bench rrm] paged engine: {paged.peak_concurrent_rows} rows at once at the peak, "
            f"{paged.rows_while_waiting:.1f} on average while prompts waited, "
            f"{figures['paged_mean_concurrent_rows']:.1f} over all its decode steps (the contiguous engine: "
            f"{stats.slots} slots, {stats.rows_while_waiting:.1f} and {row['engine_mean_concurrent_rows']:.1f}); "
            f"{paged.preemptions} preemptions ({paged.live_row_steps - useful} tokens recomputed); "
            f"peak {paged.peak_pages_in_use} of {paged.pool_pages} pages of "
            f"{paged.page_size} positions",
            file=sys.stderr,
            flush=True,
        )
        row.update(
            {
                "paged_rows": paged_rows,
                "paged_s": wall,
                "paged_compile_s": compile_s,
                "paged_tokens_per_s": useful / wall,
                "paged_vs_engine": (useful / wall) / row["engine_tokens_per_s"],
                "paged_attention": paged.attention,
                "paged_prefills": paged.prefills,
                # tokens generated by rows later preempted, generated again when their samples restarted
                "paged_recomputed_tokens": paged.live_row_steps - useful,
                **figures,
                "paged_peak_rows_vs_slots": paged.peak_concurrent_rows / stats.slots,
                "paged_rows_while_waiting_vs_engine": paged.rows_while_waiting / max(stats.rows_while_waiting, 1e-9),
            }
        )
    if static:
        steps, wall, compile_s = clock.run(lambda: _static_run(model, settings, prompts, outputs, slots, cap, seed))
        _progress("static batching", wall, useful, compile_s)
        row.update(
            {
                "static_s": wall,
                "static_compile_s": compile_s,
                "static_tokens_per_s": useful / wall,
                "static_occupancy": useful / (steps * slots),
                "engine_vs_static": row["engine_tokens_per_s"] / (useful / wall),
            }
        )
    if hf_methods:
        import torch
        from transformers import AutoModelForCausalLM

        from rrm_jax.checkpoint import save_hf

        with tempfile.TemporaryDirectory() as d:
            save_hf(model, c, d)
            hf = AutoModelForCausalLM.from_pretrained(d, dtype=getattr(torch, c.dtype)).eval()
        hf = hf.to("cuda" if torch.cuda.is_available() else "cpu")
        row["torch_threads"] = torch.get_num_threads()
    if "generate" in hf_methods:
        _hf_run(hf, prompts[:2], [2, 2], 2, temperature)  # warm-up
        _, wall, _ = clock.run(lambda: _hf_run(hf, prompts, outputs, slots, temperature))
        _progress(f"transformers generate (length-sorted static batches of {slots})", wall, useful)
        row.update(
            {
                "hf_s": wall,
                "hf_tokens_per_s": useful / wall,
                "engine_vs_hf": row["engine_tokens_per_s"] / (useful / wall),
            }
        )
    if "generate_batch" in hf_methods:
        _hf_batch_run(hf, prompts[:2], [2, 2], temperature, seed)  # warm-up
        setup_s, wall, _ = clock.run(lambda: _hf_batch_run(hf, prompts, outputs, temperature, seed))
        _progress("transformers generate_batch (continuous batching)", wall, useful)
        row.update(
            {
                "hf_batch_s": wall,
                "hf_batch_setup_s": setup_s,
                "hf_batch_tokens_per_s": useful / wall,
                "engine_vs_hf_batch": row["engine_tokens_per_s"] / (useful / wall),
                "hf_attn": getattr(hf.config, "_attn_implementation", None),
            }
        )
    return row
