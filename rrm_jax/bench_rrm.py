"""`rrm-jax bench sample --workload rrm`: throughput on requests shaped like RRM judging.

The request set is seeded: prompt lengths uniform over a range, output lengths log-normal with a median of
cap / 8 and sigma 1.1 (about 3% reach the cap), clipped to [1, cap]. Every request generates exactly its
drawn length (EOS ignored), so the work is fixed and the methods compare on the same tokens:

1. the engine (`rrm_jax.engine`): `slots` rows at once, each request with its own limit;
2. static batching (`rrm_jax.static_sampler`, the sampler before the engine): batches of `slots`
   requests in input order, the cache sized for the cap, each batch decoding until its longest row;
3. transformers `generate` (torch) in static batches of the same size, each batch run to its longest
   request (left-padded, min_new_tokens = max_new_tokens = that length).

Useful tokens/s = the sum of the drawn lengths / wall time. Compilation is part of a JAX method's wall
time (a user pays it); the seconds spent compiling are reported beside it.
"""

from __future__ import annotations

import sys
import tempfile
import time

import jax
import numpy as np

from rrm_jax import engine, static_sampler
from rrm_jax.sampling import SamplingSettings

SIGMA = 1.1  # log-normal spread of output lengths: P(length >= 8 * median) = 3%


def rrm_workload(n: int, prompt_range: tuple[int, int], cap: int, vocab_size: int, seed: int = 0):
    """-> (prompts: n lists of token ids, output lengths: n ints in [1, cap])."""
    rng = np.random.default_rng(seed)
    prompt_lens = rng.integers(prompt_range[0], prompt_range[1] + 1, n)
    prompts = [rng.integers(3, vocab_size, m).tolist() for m in prompt_lens]
    outputs = np.clip(np.rint(rng.lognormal(np.log(cap / 8), SIGMA, n)), 1, cap).astype(int)
    return prompts, outputs.tolist()


class _CompileClock:
    """Seconds JAX spends compiling while active (from jax.monitoring's backend-compile events)."""

    def __init__(self):
        self.seconds, self.active = 0.0, False
        jax.monitoring.register_event_duration_secs_listener(self._record)

    def _record(self, event, duration, **_):
        if self.active and event == "/jax/core/compile/backend_compile_duration":
            self.seconds += duration

    def run(self, fn):
        self.seconds, self.active = 0.0, True
        t = time.perf_counter()
        try:
            out = fn()
        finally:
            self.active = False
        return out, time.perf_counter() - t, self.seconds


def _progress(phase: str, wall: float, useful: int):
    """One line per finished phase on stderr, so a long run shows its figures as it goes."""
    print(f"[bench rrm] {phase}: {wall:.1f} s, {useful / wall:.1f} useful tokens/s", file=sys.stderr, flush=True)


def _engine_run(model, settings, prompts, outputs, slots, seed):
    stats = engine.EngineStats()
    reqs = [engine.Request(p, m, i) for i, (p, m) in enumerate(zip(prompts, outputs))]
    results = engine.generate(model.config, settings, model.params(), reqs, seed=seed, max_rows=slots, stats=stats)
    assert [len(r.output_ids) for r in results] == outputs
    return stats


def _static_run(model, settings, prompts, outputs, slots, cap, seed):
    steps = 0
    for start in range(0, len(prompts), slots):
        batch, limits = prompts[start:start + slots], outputs[start:start + slots]
        results = static_sampler.sample_batch(model.config, settings, model.params(), batch, cap, limits=limits,
                                              first_index=start, seed=seed)
        assert [len(r.output_ids) for r in results] == limits
        steps += max(limits)
    return steps


def _hf_run(hf, prompts, outputs, slots, temperature):
    import torch

    device = next(hf.parameters()).device
    for start in range(0, len(prompts), slots):
        batch, longest = prompts[start:start + slots], max(outputs[start:start + slots])
        width = max(len(p) for p in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(batch):  # left padding, as transformers expects for batched generation
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.inference_mode():
            out = hf.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=longest, min_new_tokens=longest,
                              do_sample=True, temperature=temperature, top_k=0, top_p=1.0, pad_token_id=0)
        assert out.shape[1] == width + longest
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_rrm(model, *, n: int, prompt_range: tuple[int, int], cap: int, slots: int, temperature: float = 0.6,
              seed: int = 0, compare_hf: bool = True, static: bool = True) -> dict:
    c = model.config
    prompts, outputs = rrm_workload(n, prompt_range, cap, c.vocab_size, seed)
    if max(len(p) for p in prompts) + cap > c.max_position_embeddings:
        raise ValueError(f"prompts up to {prompt_range[1]} tokens + cap {cap} exceed the context of {c.max_position_embeddings}")
    useful = int(sum(outputs))
    settings = SamplingSettings(float(temperature), 0, 1.0, (), None, ())
    clock = _CompileClock()
    row = {"requests": n, "prompt_lens": f"{prompt_range[0]}-{prompt_range[1]}", "cap": cap, "slots": slots,
           "useful_tokens": useful, "output_median": float(np.median(outputs)),
           "output_at_cap": float(np.mean(np.asarray(outputs) == cap)), "params_M": c.num_params / 1e6,
           "dtype": c.dtype}

    stats, wall, compile_s = clock.run(lambda: _engine_run(model, settings, prompts, outputs, slots, seed))
    _progress("engine", wall, useful)
    kv_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * np.dtype(c.dtype).itemsize
    mean_len = float(np.mean([len(p) + m for p, m in zip(prompts, outputs)]))
    row.update({
        "engine_s": wall, "engine_compile_s": compile_s, "engine_tokens_per_s": useful / wall,
        "engine_occupancy": stats.occupancy, "engine_decode_steps": stats.decode_steps,
        "engine_decode_calls": stats.decode_calls, "engine_prefill_calls": stats.prefill_calls,
        "engine_compactions": stats.compactions,
        "concurrent_sequences": stats.slots, "kv_capacity_per_slot": stats.capacity,
        "kv_budget_GB": stats.slots * stats.capacity * kv_token / 1e9,
        # what a paged cache would hold in the same budget, from this workload's mean length (computed)
        "paged_sequences_same_budget": int(stats.slots * stats.capacity / mean_len),
    })
    if static:
        steps, wall, compile_s = clock.run(lambda: _static_run(model, settings, prompts, outputs, slots, cap, seed))
        _progress("static batching", wall, useful)
        row.update({"static_s": wall, "static_compile_s": compile_s, "static_tokens_per_s": useful / wall,
                    "static_occupancy": useful / (steps * slots), "engine_vs_static": row["engine_tokens_per_s"] / (useful / wall)})
    if compare_hf:
        import torch
        from transformers import AutoModelForCausalLM

        from rrm_jax.checkpoint import save_hf

        with tempfile.TemporaryDirectory() as d:
            save_hf(model, c, d)
            hf = AutoModelForCausalLM.from_pretrained(d, dtype=getattr(torch, c.dtype)).eval()
        hf = hf.to("cuda" if torch.cuda.is_available() else "cpu")
        _hf_run(hf, prompts[:2], [2, 2], 2, temperature)  # warm-up
        _, wall, _ = clock.run(lambda: _hf_run(hf, prompts, outputs, slots, temperature))
        _progress("transformers generate", wall, useful)
        row.update({"hf_s": wall, "hf_tokens_per_s": useful / wall, "engine_vs_hf": row["engine_tokens_per_s"] / (useful / wall),
                    "torch_threads": torch.get_num_threads()})
    return row
