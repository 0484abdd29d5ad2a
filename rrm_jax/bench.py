"""`rrm-jax bench`: what the commands' programs cost on this machine.

`bench sample`: the generation engine's throughput on fixed batches against the machine's measured
ceilings (and transformers `generate` with --compare-hf); `--workload cache`: the decode step's time
against the cache length it allocates; `--workload rrm`: requests shaped like RRM judging
(`rrm_jax.bench_rrm`). `bench train`: one GRPO step's phases (rollout, log-probabilities, update).
The programs' stages carry `jax.named_scope` labels, so a profile taken around a bench names each piece.

The ceilings are measured here, by this process: memory bandwidth from a large elementwise pass
(bytes read + written / time) and peak FLOP/s from a large matmul in the benchmark's dtype. MBU is
(weight bytes + KV bytes read per decode step) / step time / bandwidth; MFU is model FLOPs per
second / peak. Roofline fraction = the step time the ceilings allow / the measured step time.
"""

from __future__ import annotations

import glob
import json
import resource
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rrm_jax import distributed, engine, generate, static_sampler
from rrm_jax.errors import UserError
from rrm_jax.model import qwen2
from rrm_jax.model.config import preset
from rrm_jax.sampling import SamplingSettings
from rrm_jax.sizes import round_up


def best_time(fn, *args, repeats=3):
    """The fastest of `repeats` runs of fn(*args) after one warm-up run (compilation), in seconds."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def _busy(fn, *args, seconds: float) -> None:
    """Run fn back to back for a while: a GPU reaches its sustained clock only under load."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        jax.block_until_ready(fn(*args))


def measure_ceilings(dtype) -> dict:
    """Memory bandwidth (bytes/s) and matmul FLOP/s of the default device, measured now: the best of
    many repeats after a second of load (three cold repeats on an H200 read 594-738 TFLOP/s)."""
    on_cpu = jax.devices()[0].platform == "cpu"
    repeats, warm_s = (3, 0.0) if on_cpu else (20, 1.0)
    n = (64 if on_cpu else 1024) * 2**20 // 4  # 64 MiB / 1 GiB of float32
    x = jnp.ones((n,), jnp.float32)
    copy = jax.jit(lambda a: a * 1.0001 + 1.0)
    _busy(copy, x, seconds=warm_s)
    bandwidth = 2 * x.nbytes / best_time(copy, x, repeats=repeats)
    m = 1024 if on_cpu else 8192
    a = jnp.ones((m, m), dtype)
    matmul = jax.jit(lambda p, q: p @ q)
    _busy(matmul, a, a, seconds=warm_s)
    t = best_time(matmul, a, a, repeats=repeats)
    return {
        "memory_bandwidth_GBps": bandwidth / 1e9,
        "peak_TFLOPs": 2 * m**3 / t / 1e12,
        "device": jax.devices()[0].device_kind,
        "platform": jax.devices()[0].platform,
    }


def _peak_memory_bytes() -> int:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # host RSS (KiB on Linux)


def bench_sample(model, *, batch: int, prompt_len: int, gen_len: int, ceilings: dict, seed: int = 0) -> dict:
    """Greedy prefill + decode of batch x prompt_len random tokens for exactly gen_len new tokens, on the
    engine's compiled programs (one prefill-insert, one decode call of gen_len steps)."""
    c = model.config
    params = model.params()
    rng = np.random.default_rng(seed)
    tokens = np.asarray(rng.integers(0, c.vocab_size, (batch, prompt_len)), np.int32)
    settings = SamplingSettings(0.0, 0, 1.0, (), None, ())  # greedy, no EOS: every row runs gen_len
    capacity, block = engine.capacity_and_block([engine.Request(tokens[0], gen_len, 0)])
    run = engine.fixed_batch(c, settings, params, tokens, gen_len, capacity, block)

    t = time.perf_counter()
    jax.block_until_ready(run.decode(run.state()))
    compile_s = time.perf_counter() - t

    prefill_s = best_time(run.state)
    decode_s = float("inf")
    for _ in range(2):
        state = jax.block_until_ready(run.state())
        t = time.perf_counter()
        out, _ = jax.block_until_ready(run.decode(state))
        decode_s = min(decode_s, time.perf_counter() - t)
    assert int(out.num_generated.min()) == gen_len

    step_s = decode_s / gen_len
    weight_bytes = decode_weight_bytes(c)
    kv_bytes = batch * (prompt_len + gen_len / 2) * c.kv_bytes_per_token  # mean cache read per step
    matmul_params = c.num_params - c.vocab_size * c.hidden_size * (0 if c.tie_word_embeddings else 1)
    attn_flops = 4 * batch * c.num_layers * c.num_heads * c.head_dim * (prompt_len + gen_len / 2)
    step_flops = 2 * matmul_params * batch + attn_flops
    bw, peak = ceilings["memory_bandwidth_GBps"] * 1e9, ceilings["peak_TFLOPs"] * 1e12
    roofline_step_s = max((weight_bytes + kv_bytes) / bw, step_flops / peak)
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "dtype": c.dtype,
        "params_M": c.num_params / 1e6,
        "compile_s": compile_s,
        "prefill_tokens_per_s": batch * prompt_len / prefill_s,
        "time_to_first_token_s": prefill_s,
        "decode_tokens_per_s": batch * gen_len / decode_s,
        "total_s": prefill_s + decode_s,  # the whole request, what transformers `generate` is timed on
        "tokens_per_s": batch * gen_len / (prefill_s + decode_s),
        "decode_step_ms": step_s * 1e3,
        "step_read_MB": (weight_bytes + kv_bytes) / 1e6,  # what MBU counts as read from memory per decode step
        "MBU": (weight_bytes + kv_bytes) / step_s / bw,
        "MFU": step_flops / step_s / peak,
        "roofline_fraction": roofline_step_s / step_s,
        "peak_memory_GB": _peak_memory_bytes() / 1e9,
    }


def decode_weight_bytes(c) -> int:
    """Bytes of weights one decode step reads: every parameter but the untied embedding table (of which a
    step reads one row per token)."""
    itemsize = jnp.dtype(c.param_dtype).itemsize
    return c.num_params * itemsize - (c.vocab_size * c.hidden_size * itemsize if not c.tie_word_embeddings else 0)


def last_level_cache_bytes() -> int:
    """The CPU's largest cache (Linux sysfs); 0 elsewhere or when unknown (accelerator caches are not read)."""
    if jax.devices()[0].platform != "cpu":
        return 0
    sizes = [0]
    for f in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        text = open(f).read().strip().upper()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG") or 0) * scale)
    return max(sizes)


def cache_note(row: dict, cache_bytes: int) -> str | None:
    """A warning when a decode step's reads fit in a cache (or MBU exceeds 100%): then MBU is not a
    memory-bandwidth figure, since the bandwidth it is divided by was measured on an array far larger."""
    fits = row["step_read_MB"] * 1e6 <= cache_bytes
    if not fits and row["MBU"] <= 1:
        return None
    where = f"fit in the {cache_bytes / 2**20:.0f} MiB last-level cache" if fits else "come partly from caches"
    return (
        f"note: batch {row['batch']}: the {row['step_read_MB']:.1f} MB a decode step reads {where}, so MBU "
        f"{row['MBU']:.0%} is not a memory-bandwidth figure; use a larger model to measure bandwidth"
    )


def bench_decode_step(model, *, batch: int, prompt_len: int, steps: int, capacities, seed: int = 0) -> list[dict]:
    """Time per decode step against the cache length allocated, with the same filled length in every
    row (prompt_len + up to `steps`): the engine's block-wise step beside the whole-cache step of the
    static sampler, measured in the same process."""
    c = model.config
    params = model.params()
    rng = np.random.default_rng(seed)
    tokens = np.asarray(rng.integers(0, c.vocab_size, (batch, prompt_len)), np.int32)
    settings = SamplingSettings(0.0, 0, 1.0, (), None, ())
    rows = []
    for capacity in capacities:
        block = min(engine.ATTENTION_BLOCK, capacity)
        capacity_rounded = round_up(capacity, block)

        engine_run = engine.fixed_batch(c, settings, params, tokens, steps, capacity_rounded, block)

        def whole_cache(state):  # the static sampler's step: every allocated position, every step
            return static_sampler.decode_fn(c, settings, steps, params, state)

        def static_state(capacity=capacity):
            return static_sampler.prefill_fn(
                c,
                capacity - prompt_len,
                1,
                None,
                params,
                tokens,
                np.full(batch, prompt_len, np.int32),
                np.full(batch, steps, np.int32),
                np.uint32(0),
                np.arange(batch, dtype=np.uint32),
            )

        timings = {}
        for name, make, run in (("engine", engine_run.state, engine_run.decode), ("static", static_state, whole_cache)):
            jax.block_until_ready(run(make()))  # compile
            best = float("inf")
            for _ in range(3):
                state = jax.block_until_ready(make())
                t = time.perf_counter()
                jax.block_until_ready(run(state))
                best = min(best, time.perf_counter() - t)
            timings[name] = best / steps
        rows.append(
            {
                "batch": batch,
                "cache_allocated": capacity,
                "filled": f"{prompt_len}-{prompt_len + steps}",
                "block": block,
                "engine_step_ms": timings["engine"] * 1e3,
                "static_step_ms": timings["static"] * 1e3,
            }
        )
    base = rows[0]
    for r in rows:
        r["engine_vs_smallest"] = r["engine_step_ms"] / base["engine_step_ms"]
        r["static_vs_smallest"] = r["static_step_ms"] / base["static_step_ms"]
    return rows


def bench_hf_generate(model, *, batch: int, prompt_len: int, gen_len: int, seed: int = 0) -> dict:
    """transformers `generate` (torch) on the same weights, batch and lengths: greedy, exactly gen_len tokens."""
    import torch  # benchmark-only reference
    from transformers import AutoModelForCausalLM

    from rrm_jax.checkpoint import save_hf

    c = model.config
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as d:
        save_hf(model, c, d)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=getattr(torch, c.dtype)).to(device).eval()
    rng = np.random.default_rng(seed)
    ids = torch.tensor(rng.integers(0, c.vocab_size, (batch, prompt_len)), device=device)
    kwargs = dict(max_new_tokens=gen_len, min_new_tokens=gen_len, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        hf.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = hf.generate(ids, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        total = time.perf_counter() - t
    assert out.shape[1] == prompt_len + gen_len
    return {"hf_total_s": total, "hf_tokens_per_s": batch * gen_len / total}


def bench_train_step(
    model,
    *,
    prompts: int,
    samples: int,
    prompt_len: int,
    gen_len: int,
    micro_batches: int,
    ceilings: dict,
    remat: bool = True,
    seed: int = 0,
) -> dict:
    """One GRPO step's phases on random prompts: rollout (sampling), logprob (a forward pass over the
    rollout) and update (forward + backward + AdamW), each timed after its compilation."""
    import optax

    from rrm_jax.rl import step

    c = model.config
    rng = np.random.default_rng(seed)
    prompt_ids = rng.integers(0, c.vocab_size, (prompts, prompt_len)).tolist()

    def rollout():
        return generate.sample(
            model, prompt_ids, max_new_tokens=gen_len, temperature=1.0, num_samples=samples, seed=seed, eos_ids=()
        )

    rollout()  # compile
    t = time.perf_counter()
    results = rollout()
    rollout_s = time.perf_counter() - t

    rows, T = prompts * samples, prompt_len + gen_len
    prompt_tokens = jnp.asarray(prompt_ids, jnp.int32)
    prompt_lengths = jnp.full((prompts,), prompt_len, jnp.int32)
    tokens = jnp.asarray([r.output_ids for r in results], jnp.int32)
    loss_mask = jnp.ones((rows, gen_len), jnp.float32)
    params = model.params()
    logprob_s = best_time(
        lambda p, *x: step.logprobs_fn(c, p, *x), params, prompt_tokens, prompt_lengths, tokens, repeats=2
    )
    old = step.logprobs_fn(c, params, prompt_tokens, prompt_lengths, tokens)
    batch = step.RolloutBatch(
        prompt_tokens,
        prompt_lengths,
        tokens,
        loss_mask,
        old,
        jnp.zeros_like(old),
        jnp.asarray(rng.normal(size=rows), jnp.float32),
        loss_mask,
    )
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-6))
    loss = step.LossSettings(remat=remat)
    params = jax.tree.map(jnp.copy, params)
    opt_state = optimizer.init(params)
    params, opt_state, _ = jax.block_until_ready(
        step.update_fn(c, loss, optimizer, micro_batches, params, opt_state, batch)
    )
    t = time.perf_counter()
    jax.block_until_ready(step.update_fn(c, loss, optimizer, micro_batches, params, opt_state, batch))
    update_s = time.perf_counter() - t

    matmul_params = c.num_params - c.vocab_size * c.hidden_size * (0 if c.tie_word_embeddings else 1)
    # each prompt is encoded once per group: the tokens the update actually processes
    train_tokens = prompts * prompt_len + rows * gen_len
    attn = 2 * c.num_layers * c.num_heads * c.head_dim * T  # causal: half of 4*L*N*H*T per token
    peak = ceilings["peak_TFLOPs"] * 1e12
    return {
        "prompts": prompts,
        "samples": samples,
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "dtype": c.dtype,
        "remat": remat,
        "rollout_s": rollout_s,
        "logprob_s": logprob_s,
        "update_s": update_s,
        "step_s": rollout_s + logprob_s + update_s,
        "rollout_tokens_per_s": rows * gen_len / rollout_s,
        "update_tokens_per_s": train_tokens / update_s,
        # 6N per token (forward + backward), the usual convention; rematerialisation's extra forward is not counted
        "update_MFU": 3 * (2 * matmul_params + attn) * train_tokens / update_s / peak,
        "logprob_MFU": (2 * matmul_params + attn) * train_tokens / logprob_s / peak,
        "peak_memory_GB": _peak_memory_bytes() / 1e9,
    }


def _bench_model(args):
    if bool(args.model) == bool(args.preset):
        raise UserError("give exactly one of --model DIR or --preset NAME")
    if args.model:
        from rrm_jax.checkpoint import load_model

        return load_model(args.model, dtype=args.dtype)[0]
    config = preset(args.preset).replace(param_dtype=args.dtype or "float32", dtype=args.dtype or "float32")
    return qwen2.Qwen2(config, rngs=nnx.Rngs(args.seed))


def _report(row: dict) -> None:
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)


def _print_ceilings(ceilings: dict, dtype) -> None:
    print(
        f"device {ceilings['device']}: measured {ceilings['memory_bandwidth_GBps']:.1f} GB/s, "
        f"{ceilings['peak_TFLOPs']:.2f} TFLOP/s ({dtype} matmul)",
        file=sys.stderr,
    )


def run_train(args) -> int:
    model = _bench_model(args)
    ceilings = measure_ceilings(jnp.dtype(model.config.dtype))
    _print_ceilings(ceilings, model.config.dtype)
    row = bench_train_step(
        model,
        prompts=args.prompts,
        samples=args.samples,
        prompt_len=args.prompt_len,
        gen_len=args.gen_len,
        micro_batches=args.micro_batches,
        ceilings=ceilings,
        remat=not args.no_remat,
        seed=args.seed,
    )
    _report(row)
    if args.json and distributed.is_main_process():  # one file, however many processes
        with open(args.json, "w") as f:
            json.dump({"ceilings": ceilings, "results": [row]}, f, indent=1)
    return 0


def _write_json(path, payload) -> None:
    if path and distributed.is_main_process():  # one file, however many processes
        with open(path, "w") as f:
            json.dump(payload, f, indent=1)


def _hf_methods(args) -> tuple[str, ...]:
    """The transformers methods --compare-hf asks for (none without the flag, all that apply with no value)."""
    if args.compare_hf is None:
        return ()
    if args.workload == "cache":
        raise UserError("--compare-hf: --workload cache has no transformers baseline")
    applicable = ("generate", "generate_batch") if args.workload == "rrm" else ("generate",)
    if not set(args.compare_hf) <= set(applicable):
        raise UserError(
            f"--compare-hf {' '.join(args.compare_hf)}: --workload {args.workload} takes {' and '.join(applicable)}"
        )
    return tuple(args.compare_hf) or applicable


def run_sample(args) -> int:
    hf_methods = _hf_methods(args)
    model = _bench_model(args)
    if args.workload == "rrm":
        from rrm_jax import bench_rrm

        lo, hi = args.prompt_range
        if not 1 <= lo <= hi or args.max_new_tokens < 1 or args.requests < 1 or args.slots < 1:
            raise UserError(
                "--workload rrm needs 1 <= --prompt-range LO <= HI and --max-new-tokens, --requests, --slots >= 1"
            )
        if args.paged_rows is not None and args.paged_rows < 1:
            raise UserError("--paged-rows must be >= 1")
        if hi + args.max_new_tokens > model.config.max_position_embeddings:
            raise UserError(
                f"--prompt-range up to {hi} + --max-new-tokens {args.max_new_tokens} exceeds the "
                f"model's context of {model.config.max_position_embeddings} tokens"
            )
        ceilings = measure_ceilings(jnp.dtype(model.config.dtype))  # the achieved bandwidth's reference
        _print_ceilings(ceilings, model.config.dtype)
        row = bench_rrm.bench_rrm(
            model,
            n=args.requests,
            prompt_range=(lo, hi),
            cap=args.max_new_tokens,
            slots=args.slots,
            temperature=args.temperature,
            seed=args.seed,
            hf_methods=hf_methods,
            static=not args.no_static,
            ceilings=ceilings,
            prefill_tokens=args.prefill_tokens,
            paged_rows=args.paged_rows,
        )
        _report(row)
        _write_json(args.json, {"ceilings": ceilings, "results": [row]})
        return 0
    if args.workload == "cache":
        rows = bench_decode_step(
            model, batch=args.batch[0], prompt_len=args.prompt_len, steps=args.gen_len, capacities=args.cache_lens
        )
        for r in rows:
            _report(r)
        _write_json(args.json, {"results": rows})
        return 0
    ceilings = measure_ceilings(jnp.dtype(model.config.dtype))
    _print_ceilings(ceilings, model.config.dtype)
    rows = []
    for batch in args.batch:
        r = bench_sample(
            model, batch=batch, prompt_len=args.prompt_len, gen_len=args.gen_len, ceilings=ceilings, seed=args.seed
        )
        if hf_methods:
            r.update(
                bench_hf_generate(model, batch=batch, prompt_len=args.prompt_len, gen_len=args.gen_len, seed=args.seed)
            )
            r["speedup_vs_hf"] = r["hf_total_s"] / r["total_s"]  # same work: prefill + gen_len decode steps
        rows.append(r)
        _report(r)
        note = cache_note(r, last_level_cache_bytes())
        if note:
            print(note, file=sys.stderr)
    _write_json(args.json, {"ceilings": ceilings, "results": rows})
    return 0
