"""Sampling: one jitted prefill and one jitted `lax.while_loop` decode over a per-row KV cache.

Prompts are right-padded to a length bucket and written into the cache at [0, length); each row then
writes at its own position, so prompts of any lengths decode together. `num_samples` copies of a
prompt share one prefill. The decode loop stops as soon as every row is finished; its state is
donated so the cache is updated in place. Parameters are always jit arguments, never constants.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from rrm_jax import distributed, parallel
from rrm_jax.errors import UserError
from rrm_jax.model import qwen2
from rrm_jax.model.config import Qwen2Config

FINISH_EOS = "eos"
FINISH_LENGTH = "length"
THINK_END_TEXT = "\n</think>\n\n"  # forced when a row reaches its thinking budget
MIN_BUCKET = 16


@dataclasses.dataclass
class Sample:
    """One generated continuation. `logprobs` are under the unmodified model (temperature 1, no
    filtering); `sampling_logprobs` under the distribution actually sampled from (None for greedy)."""

    output_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    text: str | None = None
    sampling_logprobs: list[float] | None = None


class SamplingSettings(NamedTuple):
    """Static (compile-time) decoding settings."""

    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    eos_ids: tuple[int, ...]
    max_think_tokens: int | None  # None = no budget
    think_end_ids: tuple[int, ...]  # forced at the budget; the last one closes the thinking block


class DecodeState(NamedTuple):
    cache: qwen2.KVCache
    logits: jax.Array  # [B, V] float32, the distribution of the next token
    tokens: jax.Array  # [B, G] int32 generated ids
    logprobs: jax.Array  # [B, G] float32 under the model
    sampling_logprobs: jax.Array  # [B, G] float32 under the sampling distribution
    num_generated: jax.Array  # [B] int32
    done: jax.Array  # [B] bool
    forced: jax.Array  # [B] int32: index into think_end_ids being forced, -1 = not forcing
    think_closed: jax.Array  # [B] bool
    row_keys: jax.Array  # [B] PRNG keys, one stream per (prompt, sample)
    step: jax.Array  # [] int32


def bucket_length(n: int, buckets: Sequence[int] | None = None) -> int:
    """Smallest bucket >= n: powers of two (at least MIN_BUCKET) unless explicit buckets are given."""
    if buckets:
        for b in sorted(buckets):
            if b >= n:
                return b
        raise UserError(f"prompt of {n} tokens is longer than the largest bucket {max(buckets)}")
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


def filter_logits(logits, temperature: float, top_k: int, top_p: float):
    """Temperature, then top-k, then top-p (smallest set whose probability reaches p), in the order of
    transformers and vLLM. Returns float32 logits with removed tokens at -inf."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < top_p  # always keeps the most likely token
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


def _choose(settings: SamplingSettings, logits, keys, step):
    """Next token per row and its log-probability under the sampling distribution."""
    if settings.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), jnp.zeros(logits.shape[0], jnp.float32)
    filtered = filter_logits(logits, settings.temperature, settings.top_k, settings.top_p)
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
    token = jax.vmap(jax.random.categorical)(step_keys, filtered).astype(jnp.int32)
    logp = jnp.take_along_axis(jax.nn.log_softmax(filtered, axis=-1), token[:, None], axis=-1)[:, 0]
    return token, logp


def _decode_body(config: Qwen2Config, settings: SamplingSettings, params, s: DecodeState) -> DecodeState:
    token, sampling_logp = _choose(settings, s.logits, s.row_keys, s.step)

    if settings.max_think_tokens is not None:
        forced_ids = jnp.asarray(settings.think_end_ids, jnp.int32)
        start = (~s.think_closed) & (s.forced < 0) & (s.num_generated >= settings.max_think_tokens)
        forced = jnp.where(start, 0, s.forced)
        forcing = forced >= 0
        token = jnp.where(forcing, forced_ids[jnp.maximum(forced, 0)], token)
        next_forced = jnp.where(forcing & (forced + 1 < len(settings.think_end_ids)), forced + 1, -1)
        think_closed = s.think_closed | (token == settings.think_end_ids[-1])
    else:
        next_forced, think_closed = s.forced, s.think_closed

    logp = jnp.take_along_axis(jax.nn.log_softmax(s.logits, axis=-1), token[:, None], axis=-1)[:, 0]
    active = ~s.done
    rows = jnp.arange(token.shape[0])
    col = jnp.where(active, s.num_generated, settings.max_new_tokens)  # out of range -> dropped
    tokens = s.tokens.at[rows, col].set(token, mode="drop")
    logprobs = s.logprobs.at[rows, col].set(logp, mode="drop")
    sampling_logprobs = s.sampling_logprobs.at[rows, col].set(sampling_logp, mode="drop")
    num_generated = s.num_generated + active.astype(jnp.int32)
    is_eos = jnp.isin(token, jnp.asarray(settings.eos_ids, jnp.int32)) if settings.eos_ids else False
    done = s.done | (active & is_eos) | (num_generated >= settings.max_new_tokens)

    logits, cache = qwen2.decode_step(config, params, token, s.cache)
    return DecodeState(cache, logits, tokens, logprobs, sampling_logprobs, num_generated, done,
                       next_forced, think_closed, s.row_keys, s.step + 1)


def _decode_loop(config: Qwen2Config, settings: SamplingSettings, params, state: DecodeState) -> DecodeState:
    def not_finished(s):
        return (s.step < settings.max_new_tokens) & ~jnp.all(s.done)

    return jax.lax.while_loop(not_finished, lambda s: _decode_body(config, settings, params, s), state)


def _prefill(config: Qwen2Config, settings: SamplingSettings, num_samples: int, mesh,
             params, tokens, lengths, seed, row_ids) -> DecodeState:
    """Prefill each prompt once, then give each of its num_samples rows a copy of its cache.
    Row r samples from the stream fold_in(key(seed), row_ids[r])."""
    cache_len = tokens.shape[1] + settings.max_new_tokens
    logits, cache = qwen2.prefill(config, params, tokens, lengths, cache_len)
    if num_samples > 1:
        cache = qwen2.KVCache(jnp.repeat(cache.keys, num_samples, axis=1),
                              jnp.repeat(cache.values, num_samples, axis=1),
                              jnp.repeat(cache.lengths, num_samples))
        logits = jnp.repeat(logits, num_samples, axis=0)
    if mesh is not None:  # batch over (data, fsdp), kv heads over tp
        kv = parallel.logical_sharding(("layers", "batch", "length", "kv_heads", "head_dim"), mesh, cache.keys.shape)
        cache = qwen2.KVCache(jax.lax.with_sharding_constraint(cache.keys, kv),
                              jax.lax.with_sharding_constraint(cache.values, kv), cache.lengths)
    rows, G = logits.shape[0], settings.max_new_tokens
    return DecodeState(
        cache=cache, logits=logits,
        tokens=jnp.zeros((rows, G), jnp.int32),
        logprobs=jnp.zeros((rows, G), jnp.float32),
        sampling_logprobs=jnp.zeros((rows, G), jnp.float32),
        num_generated=jnp.zeros(rows, jnp.int32),
        done=jnp.zeros(rows, bool),
        forced=jnp.full(rows, -1, jnp.int32),
        think_closed=jnp.zeros(rows, bool),
        row_keys=jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(row_ids),
        step=jnp.zeros((), jnp.int32),
    )


# Compiled once per (config, settings, shapes); parameters and state are arguments.
prefill_fn = jax.jit(_prefill, static_argnums=(0, 1, 2, 3))
decode_fn = jax.jit(_decode_loop, static_argnums=(0, 1), donate_argnums=(3,))


def _mesh_of(params):
    sharding = getattr(params["embed"], "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
        return sharding.mesh
    return None


def resolve_eos_ids(config: Qwen2Config, tokenizer=None, eos_ids=None) -> tuple[int, ...]:
    if eos_ids is not None:
        return tuple(int(i) for i in ([eos_ids] if isinstance(eos_ids, int) else eos_ids))
    if config.eos_ids:
        return config.eos_ids
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        return (int(tokenizer.eos_token_id),)
    return ()


def think_end_ids(tokenizer) -> tuple[int, ...]:
    if tokenizer is None:
        raise UserError("max_think_tokens needs a tokenizer (to encode the forced '</think>'), or pass think_end_ids")
    return tuple(tokenizer.encode(THINK_END_TEXT, add_special_tokens=False))


def check_prompts(config: Qwen2Config, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """Every prompt non-empty and, with its new tokens, inside the model's context."""
    for i, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise UserError(f"prompt {i} is empty")
        if len(p) + max_new_tokens > config.max_position_embeddings:
            raise UserError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that exceeds the "
                            f"model's context of {config.max_position_embeddings} tokens")


def sample(model, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
           top_p: float = 1.0, top_k: int = 0, num_samples: int = 1, seed: int = 0, eos_ids=None,
           max_think_tokens: int | None = None, tokenizer=None, think_end_ids_override=None,
           batch_size: int | None = None, buckets: Sequence[int] | None = None,
           progress=None) -> list[Sample]:
    """Generate from a list of token-id prompts. Returns num_samples results per prompt, prompt-major.

    batch_size: prompts per compiled batch (default: all). Batches are padded to a power of two
    and prompt lengths to a bucket, so a stream of varied requests reuses a few compilations.
    progress: optional callable, called with the number of prompts finished after each batch.
    With a model sharded over the devices of several processes, every process calls this with the
    same prompts and gets every result back (the trainer gathers each step's prompts first)."""
    config: Qwen2Config = model.config
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or num_samples < 1:
        raise UserError(f"invalid sampling settings temperature={temperature} top_p={top_p} top_k={top_k} "
                        f"num_samples={num_samples}: need temperature >= 0, 0 < top_p <= 1, top_k >= 0, num_samples >= 1")
    check_prompts(config, prompt_ids, max_new_tokens)
    forced = ()
    if max_think_tokens is not None:
        forced = tuple(think_end_ids_override) if think_end_ids_override else think_end_ids(tokenizer)
    settings = SamplingSettings(
        max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_k=int(top_k),
        top_p=float(top_p), eos_ids=resolve_eos_ids(config, tokenizer, eos_ids),
        max_think_tokens=None if max_think_tokens is None else int(max_think_tokens), think_end_ids=forced)

    params = model.params()
    mesh = _mesh_of(params)
    batch_size = batch_size or len(prompt_ids)
    results: list[Sample] = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = [list(map(int, p)) for p in prompt_ids[start:start + batch_size]]
        results.extend(_sample_batch(config, settings, params, chunk, start, num_samples, seed, mesh, buckets, tokenizer))
        if progress is not None:
            progress(len(chunk))
    return results


def _padded_batch(n_prompts: int, num_samples: int, mesh) -> int:
    """Prompts per compiled batch: a power of two, enough for the mesh's batch axes to divide the rows."""
    n = 1 << (n_prompts - 1).bit_length()
    if mesh is not None:
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        while (n * num_samples) % shards:
            n *= 2
    return n


def _sample_batch(config, settings, params, chunk, first_index, num_samples, seed, mesh, buckets, tokenizer):
    n_real = len(chunk)
    n = _padded_batch(n_real, num_samples, mesh)
    P = bucket_length(max(len(p) for p in chunk), buckets)
    tokens = np.zeros((n, P), np.int32)
    lengths = np.ones(n, np.int32)  # padding prompts: one token, results dropped
    for i, p in enumerate(chunk):
        tokens[i, :len(p)] = p
        lengths[i] = len(p)
    # One key per (prompt, sample), from the prompt's global index: results do not depend on batching.
    row_ids = (first_index + np.repeat(np.arange(n), num_samples)) * num_samples + np.tile(np.arange(num_samples), n)
    row_ids = row_ids.astype(np.uint32)

    if mesh is not None:
        batch = parallel.logical_sharding(("batch", "length"), mesh)
        tokens, lengths = jax.device_put(tokens, batch), jax.device_put(lengths, parallel.logical_sharding(("batch",), mesh))
        row_ids = jax.device_put(row_ids, parallel.logical_sharding(("batch",), mesh))
    state = prefill_fn(config, settings, num_samples, mesh, params, tokens, lengths, np.uint32(seed % 2**32), row_ids)
    state = decode_fn(config, settings, params, state)

    out_tokens, out_logp, out_slogp, counts, done = distributed.fetch(
        (state.tokens, state.logprobs, state.sampling_logprobs, state.num_generated, state.done))
    eos = set(settings.eos_ids)
    results = []
    for r in range(n_real * num_samples):
        k = int(counts[r])
        ids = out_tokens[r, :k].tolist()
        finish = FINISH_EOS if ids and ids[-1] in eos else FINISH_LENGTH
        text = None
        if tokenizer is not None:
            text = tokenizer.decode(ids[:-1] if finish == FINISH_EOS else ids, skip_special_tokens=False)
        results.append(Sample(
            output_ids=ids, logprobs=out_logp[r, :k].tolist(), finish_reason=finish, text=text,
            sampling_logprobs=None if settings.temperature == 0.0 else out_slogp[r, :k].tolist()))
    return results
