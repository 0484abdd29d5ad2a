"""Static batching, the sampler before the engine: each batch of prompts is prefilled together and decoded
in one `lax.while_loop` until its longest row ends, attending over the whole allocated cache every step.

Kept as the baseline of `rrm-jax bench sample --workload rrm` and as a reference in the engine's tests;
`rrm_jax.sample` runs on `rrm_jax.engine`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rrm_jax import distributed, parallel
from rrm_jax.model import qwen2
from rrm_jax.model.config import Qwen2Config
from rrm_jax.sampling import Sample, SamplingSettings, bucket_length, is_eos, make_sample, next_tokens, row_keys
from rrm_jax.sizes import batch_shards, next_power_of_two


class DecodeState(NamedTuple):
    cache: qwen2.KVCache
    logits: jax.Array  # [B, V] float32, the distribution of the next token
    tokens: jax.Array  # [B, G] int32 generated ids
    logprobs: jax.Array  # [B, G] float32 under the model
    sampling_logprobs: jax.Array  # [B, G] float32 under the sampling distribution
    num_generated: jax.Array  # [B] int32
    limits: jax.Array  # [B] int32: the row's own limit (<= max_new_tokens, which sizes the cache)
    done: jax.Array  # [B] bool
    think_end_index: jax.Array  # [B] int32: index into think_end_ids of the token to force next, -1 = not forcing
    think_closed: jax.Array  # [B] bool
    row_keys: jax.Array  # [B] PRNG keys, one stream per (prompt, sample)
    step: jax.Array  # [] int32


def _decode_body(
    config: Qwen2Config, settings: SamplingSettings, max_new_tokens: int, params, s: DecodeState
) -> DecodeState:
    nxt = next_tokens(settings, s.logits, s.row_keys, s.num_generated, s.think_end_index, s.think_closed)
    active = ~s.done
    rows = jnp.arange(nxt.tokens.shape[0])
    col = jnp.where(active, s.num_generated, max_new_tokens)  # out of range -> dropped
    tokens = s.tokens.at[rows, col].set(nxt.tokens, mode="drop")
    logprobs = s.logprobs.at[rows, col].set(nxt.logprobs, mode="drop")
    sampling_logprobs = s.sampling_logprobs.at[rows, col].set(nxt.sampling_logprobs, mode="drop")
    num_generated = s.num_generated + active.astype(jnp.int32)
    done = s.done | (active & is_eos(settings, nxt.tokens)) | (num_generated >= s.limits)
    logits, cache = qwen2.decode_step(config, params, nxt.tokens, s.cache)  # the whole cache, every row
    return DecodeState(
        cache,
        logits,
        tokens,
        logprobs,
        sampling_logprobs,
        num_generated,
        s.limits,
        done,
        nxt.think_end_index,
        nxt.think_closed,
        s.row_keys,
        s.step + 1,
    )


def _decode_loop(
    config: Qwen2Config, settings: SamplingSettings, max_new_tokens: int, params, state: DecodeState
) -> DecodeState:
    def not_finished(s):
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    return jax.lax.while_loop(not_finished, lambda s: _decode_body(config, settings, max_new_tokens, params, s), state)


def _prefill(
    config: Qwen2Config, max_new_tokens: int, num_samples: int, mesh, params, tokens, lengths, limits, seed, row_ids
) -> DecodeState:
    """Prefill each prompt once, then give each of its num_samples rows a copy of its cache."""
    cache_len = tokens.shape[1] + max_new_tokens
    logits, cache = qwen2.prefill(config, params, tokens, lengths, cache_len)
    if num_samples > 1:
        cache = qwen2.KVCache(
            jnp.repeat(cache.keys, num_samples, axis=1),
            jnp.repeat(cache.values, num_samples, axis=1),
            jnp.repeat(cache.lengths, num_samples),
        )
        logits = jnp.repeat(logits, num_samples, axis=0)
        limits = jnp.repeat(limits, num_samples)
    if mesh is not None:  # batch over (data, fsdp), kv heads over tp
        kv = parallel.logical_sharding(("layers", "batch", "length", "kv_heads", "head_dim"), mesh, cache.keys.shape)
        cache = qwen2.KVCache(
            jax.lax.with_sharding_constraint(cache.keys, kv),
            jax.lax.with_sharding_constraint(cache.values, kv),
            cache.lengths,
        )
    rows, G = logits.shape[0], max_new_tokens
    return DecodeState(
        cache=cache,
        logits=logits,
        tokens=jnp.zeros((rows, G), jnp.int32),
        logprobs=jnp.zeros((rows, G), jnp.float32),
        sampling_logprobs=jnp.zeros((rows, G), jnp.float32),
        num_generated=jnp.zeros(rows, jnp.int32),
        limits=limits.astype(jnp.int32),
        done=jnp.zeros(rows, bool),
        think_end_index=jnp.full(rows, -1, jnp.int32),
        think_closed=jnp.zeros(rows, bool),
        row_keys=row_keys(seed, row_ids),
        step=jnp.zeros((), jnp.int32),
    )


prefill_fn = jax.jit(_prefill, static_argnums=(0, 1, 2, 3))
decode_fn = jax.jit(_decode_loop, static_argnums=(0, 1, 2), donate_argnums=(4,))


def _padded_batch(n_prompts: int, num_samples: int, mesh) -> int:
    """Prompts per compiled batch: a power of two, enough for the mesh's batch axes to divide the rows."""
    n = next_power_of_two(n_prompts)
    while (n * num_samples) % batch_shards(mesh):
        n *= 2
    return n


def sample_batch(
    config: Qwen2Config,
    settings: SamplingSettings,
    params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    limits: Sequence[int] | None = None,
    first_index: int = 0,
    num_samples: int = 1,
    seed: int = 0,
    mesh=None,
    buckets=None,
    tokenizer=None,
) -> list[Sample]:
    """One static batch: `prompts` (global indices first_index, first_index + 1, ...) decoded
    together until every row is done: EOS, max_new_tokens or its own entry of `limits` (the cache is
    sized for max_new_tokens, as when rows end by EOS well before the cap)."""
    n_real = len(prompts)
    n = _padded_batch(n_real, num_samples, mesh)
    P = bucket_length(max(len(p) for p in prompts), buckets)
    tokens = np.zeros((n, P), np.int32)
    lengths = np.ones(n, np.int32)  # padding prompts: one token and one new token, results dropped
    row_limits = np.ones(n, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
        lengths[i] = len(p)
        row_limits[i] = max_new_tokens if limits is None else limits[i]
    row_ids = (first_index + np.repeat(np.arange(n), num_samples)) * num_samples + np.tile(np.arange(num_samples), n)
    row_ids = row_ids.astype(np.uint32)
    if mesh is not None:
        batch = parallel.logical_sharding(("batch", "length"), mesh)
        tokens, lengths = (
            jax.device_put(tokens, batch),
            jax.device_put(lengths, parallel.logical_sharding(("batch",), mesh)),
        )
        row_ids = jax.device_put(row_ids, parallel.logical_sharding(("batch",), mesh))
        row_limits = jax.device_put(row_limits, parallel.logical_sharding(("batch",), mesh))
    state = prefill_fn(
        config, max_new_tokens, num_samples, mesh, params, tokens, lengths, row_limits, np.uint32(seed % 2**32), row_ids
    )
    state = decode_fn(config, settings, max_new_tokens, params, state)
    out_tokens, out_logp, out_slogp, counts = distributed.gather_to_host(
        (state.tokens, state.logprobs, state.sampling_logprobs, state.num_generated)
    )
    return [
        make_sample(
            settings, out_tokens[r, : counts[r]], out_logp[r, : counts[r]], out_slogp[r, : counts[r]], tokenizer
        )
        for r in range(n_real * num_samples)
    ]
