"""Continuous-batching generation engine: a fixed set of slots, each a contiguous per-row KV cache,
refilled with waiting prompts as rows finish, decoding in chunks of steps between host checks.

The host loop is plain Python over three jitted programs:

    prefill_fn  prefill a group of waiting prompts once and insert their caches (one copy per sample)
                into free slots of the running batch;
    decode_fn   run up to `chunk` decode steps for every slot (finished slots idle), stopping early once
                enough slots have finished that a refill is worth it; returns the tokens it emitted;
    empty_state allocate the slots.

A decode step attends only over the smallest window of the cache (128, 256, 512, ... positions) that
holds the longest live row (`qwen2.decode_step` with a block size), so its cost follows the tokens
present, not the capacity allocated for the longest request; on a CPU each row reads its own window
(`reads_row_windows`), so a long row no longer makes every short one read its length. Rows keep their
own random streams (see `rrm_jax.sampling`), so results do not depend on the slot, the slot count, the
other requests or their order.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rrm_jax import distributed, parallel
from rrm_jax.model import qwen2
from rrm_jax.model.config import Qwen2Config
from rrm_jax.sampling import Sample, SamplingSettings, bucket_length, is_eos, make_sample, next_tokens, row_keys

ATTENTION_BLOCK = 128  # the smallest attention window; windows double up to the whole cache
CHUNK_STEPS = 32  # decode steps per device call between host checks


class SlotState(NamedTuple):
    """The running batch, one row per slot. A free slot is `done` with limit 0."""

    cache: qwen2.KVCache  # keys / values [L, B, S, K, H]; lengths [B]
    logits: jax.Array  # [B, V] float32: the distribution of each row's next token
    num_generated: jax.Array  # [B] int32
    limit: jax.Array  # [B] int32: the row's max_new_tokens
    done: jax.Array  # [B] bool
    forced: jax.Array  # [B] int32: thinking-budget token being forced, -1 = none
    think_closed: jax.Array  # [B] bool
    keys: jax.Array  # [B, 2] uint32: raw PRNG key of the row's stream


class Emitted(NamedTuple):
    """What one decode_fn call generated: column t holds step t's token for every row that was live."""

    tokens: jax.Array  # [B, chunk] int32
    logprobs: jax.Array  # [B, chunk] float32
    sampling_logprobs: jax.Array  # [B, chunk] float32


def _constrain_cache(cache: qwen2.KVCache, mesh) -> qwen2.KVCache:
    if mesh is None:  # batch over (data, fsdp), kv heads over tp
        return cache
    kv = parallel.logical_sharding(("layers", "batch", "length", "kv_heads", "head_dim"), mesh, cache.keys.shape)
    return qwen2.KVCache(jax.lax.with_sharding_constraint(cache.keys, kv),
                         jax.lax.with_sharding_constraint(cache.values, kv), cache.lengths)


def _empty_state(config: Qwen2Config, slots: int, capacity: int, mesh) -> SlotState:
    dt = jnp.dtype(config.dtype)
    shape = (config.num_layers, slots, capacity, config.num_kv_heads, config.head_dim)
    cache = _constrain_cache(qwen2.KVCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt), jnp.zeros(slots, jnp.int32)), mesh)
    return SlotState(cache=cache, logits=jnp.zeros((slots, config.vocab_size), jnp.float32),
                     num_generated=jnp.zeros(slots, jnp.int32), limit=jnp.zeros(slots, jnp.int32),
                     done=jnp.ones(slots, bool), forced=jnp.full(slots, -1, jnp.int32),
                     think_closed=jnp.zeros(slots, bool), keys=jnp.zeros_like(jax.random.key_data(row_keys(0, jnp.zeros(slots, jnp.uint32)))))


def _prefill_insert(config: Qwen2Config, num_samples: int, mesh, params, state: SlotState, tokens, lengths,
                    limits, slots, seed, row_ids) -> SlotState:
    """Prefill right-padded prompts tokens [n, P] (lengths [n], limits [n]) once each and insert each
    prompt's cache into num_samples slots (slots [n * num_samples], prompt-major); row r of the group
    samples from the stream of row_ids[r]."""
    P = tokens.shape[1]
    logits, new = qwen2.prefill(config, params, tokens, lengths, P)
    keys, values = new.keys, new.values
    if num_samples > 1:
        keys, values = jnp.repeat(keys, num_samples, axis=1), jnp.repeat(values, num_samples, axis=1)
        logits = jnp.repeat(logits, num_samples, axis=0)
        lengths, limits = jnp.repeat(lengths, num_samples), jnp.repeat(limits, num_samples)
    cache = qwen2.KVCache(state.cache.keys.at[:, slots, :P].set(keys.astype(state.cache.keys.dtype)),
                          state.cache.values.at[:, slots, :P].set(values.astype(state.cache.values.dtype)),
                          state.cache.lengths.at[slots].set(lengths))
    return SlotState(
        cache=_constrain_cache(cache, mesh),
        logits=state.logits.at[slots].set(logits),
        num_generated=state.num_generated.at[slots].set(0),
        limit=state.limit.at[slots].set(limits),
        done=state.done.at[slots].set(False),
        forced=state.forced.at[slots].set(-1),
        think_closed=state.think_closed.at[slots].set(False),
        keys=state.keys.at[slots].set(jax.random.key_data(row_keys(seed, row_ids))),
    )


def _decode_chunk(config: Qwen2Config, settings: SamplingSettings, chunk: int, block: int, mesh, params,
                  state: SlotState, stop_at_done):
    """Up to `chunk` decode steps; stops early when every row is done or stop_at_done rows are."""
    B = state.done.shape[0]
    row_windows = reads_row_windows(mesh)
    emitted = Emitted(jnp.zeros((B, chunk), jnp.int32), jnp.zeros((B, chunk), jnp.float32),
                      jnp.zeros((B, chunk), jnp.float32))

    def go_on(carry):
        s, _, t = carry
        n_done = jnp.sum(s.done.astype(jnp.int32))
        return (t < chunk) & (n_done < B) & (n_done < stop_at_done)

    def step(carry):
        s, e, t = carry
        nxt = next_tokens(settings, s.logits, jax.random.wrap_key_data(s.keys), s.num_generated, s.forced,
                          s.think_closed)
        active = ~s.done
        e = Emitted(e.tokens.at[:, t].set(nxt.tokens), e.logprobs.at[:, t].set(nxt.logprobs),
                    e.sampling_logprobs.at[:, t].set(nxt.sampling_logprobs))
        num_generated = s.num_generated + active.astype(jnp.int32)
        done = s.done | (active & is_eos(settings, nxt.tokens)) | (num_generated >= s.limit)
        logits, cache = qwen2.decode_step(config, params, nxt.tokens, s.cache, active=active, block_size=block,
                                          row_windows=row_windows)
        s = SlotState(_constrain_cache(cache, mesh), logits, num_generated, s.limit, done, nxt.forced,
                      nxt.think_closed, s.keys)
        return s, e, t + 1

    state, emitted, _ = jax.lax.while_loop(go_on, step, (state, emitted, jnp.zeros((), jnp.int32)))
    return state, emitted


def reads_row_windows(mesh) -> bool:
    """Whether each row's attention reads its own window (qwen2.decode_step's row_windows) rather than the
    batch's longest: on one CPU device, where a loop over the rows is cheap and the cache reads are most
    of a step. Not on an accelerator, where the loop would serialise work the device does in parallel,
    nor over a mesh, where slicing one row out of the sharded batch would gather it."""
    return mesh is None and jax.default_backend() == "cpu"


def _compact(mesh, state: SlotState, keep) -> SlotState:
    """The slot state of the rows in `keep` [n] (slot indices) only: every per-slot array gathered along
    its batch axis, so the decode steps that follow compute n rows instead of all the slots."""
    cache = qwen2.KVCache(state.cache.keys[:, keep], state.cache.values[:, keep], state.cache.lengths[keep])
    return SlotState(_constrain_cache(cache, mesh), state.logits[keep], state.num_generated[keep], state.limit[keep],
                     state.done[keep], state.forced[keep], state.think_closed[keep], state.keys[keep])


# Compiled once per (config, shapes, static settings); parameters and the slot state are arguments, and
# the state is donated so the cache is updated in place.
empty_state_fn = jax.jit(_empty_state, static_argnums=(0, 1, 2, 3))
prefill_fn = jax.jit(_prefill_insert, static_argnums=(0, 1, 2), donate_argnums=(4,))
decode_fn = jax.jit(_decode_chunk, static_argnums=(0, 1, 2, 3, 4), donate_argnums=(6,))
compact_fn = jax.jit(_compact, static_argnums=(0,))  # no donation: the output is smaller than the input


@dataclasses.dataclass
class Request:
    """One prompt to generate for: its token ids, its own length limit and its index, which (with the
    sample index) picks its random streams."""

    prompt_ids: Sequence[int]
    max_new_tokens: int
    index: int


@dataclasses.dataclass
class EngineStats:
    """Counters of one `generate` call (the benchmark and tests read them)."""

    slots: int = 0  # at the start; the running batch shrinks once no prompt waits (compactions)
    capacity: int = 0  # KV positions per slot
    prefills: int = 0  # prompts prefilled (each exactly once)
    prefill_calls: int = 0
    decode_calls: int = 0
    decode_steps: int = 0
    live_row_steps: int = 0  # sum over steps of the rows generating
    computed_row_steps: int = 0  # sum over steps of the rows the step computed (the running batch's size)
    compactions: int = 0

    @property
    def occupancy(self) -> float:
        """The fraction of the computed rows that generated a token."""
        return self.live_row_steps / max(1, self.computed_row_steps)


def _group_size(n: int) -> int:
    """Prompts per prefill call: the largest power of four <= n, so a run compiles at most
    log4(slots) + 1 prefill programs per prompt bucket and never prefills a padding prompt."""
    size = 1
    while size * 4 <= n:
        size *= 4
    return size


def slot_count(n_rows: int, max_rows: int | None, num_samples: int, mesh) -> int:
    """Slots for n_rows rows: all of them, rounded up to a power of two (so varied request counts share
    compilations), but at most max_rows (and at least one prompt's samples); a multiple of the mesh's
    batch shards."""
    n = 1 << max(0, (n_rows - 1).bit_length())
    if max_rows is not None:
        n = min(n, max(max_rows, num_samples))
    if mesh is not None:
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        n = -(-n // shards) * shards
    return n


def capacity_and_block(requests: Sequence[Request], buckets=None, block_size: int = ATTENTION_BLOCK):
    """KV positions per slot and the attention block: room for the longest prompt's bucket plus the largest
    limit (a function of buckets and limits only, so similar calls share compilations), rounded up to a
    whole number of blocks."""
    need = bucket_length(max(len(r.prompt_ids) for r in requests), buckets) + max(r.max_new_tokens for r in requests)
    block = min(block_size, 1 << (need - 1).bit_length())
    return -(-need // block) * block, block


def compacted_size(live: int, slots: int, mesh) -> int | None:
    """The smaller running batch for `live` rows once no prompt waits: the power of two that holds them
    (a multiple of the mesh's batch shards), when that is at most half of `slots`; else None."""
    shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    size = max(1 << max(0, (live - 1).bit_length()), shards)
    size = -(-size // shards) * shards
    return size if size * 2 <= slots else None


def _place(x, mesh):
    """Host array -> device, replicated over the mesh (the same value on every process)."""
    if mesh is None:
        return x
    return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))


class _Row:
    __slots__ = ("request", "sample", "tokens", "logprobs", "sampling_logprobs")

    def __init__(self, request: int, sample: int):
        self.request, self.sample = request, sample
        self.tokens, self.logprobs, self.sampling_logprobs = [], [], []


def generate(config: Qwen2Config, settings: SamplingSettings, params, requests: Sequence[Request], *,
             num_samples: int = 1, seed: int = 0, max_rows: int | None = None, mesh=None, buckets=None,
             tokenizer=None, progress=None, block_size: int = ATTENTION_BLOCK, chunk: int = CHUNK_STEPS,
             refill_rows: int | None = None, stats: EngineStats | None = None) -> list[Sample]:
    """Generate num_samples continuations of every request with continuous batching. Returns them
    request-major (request i's samples at [i * num_samples, (i + 1) * num_samples)).

    max_rows: rows decoding at once, i.e. slots (default: all requests' rows, rounded up to a power of
    two). refill_rows: a decode call returns early once this many slots are free while prompts wait
    (default: a sixteenth of the slots, at least one prompt's samples). Once no prompt waits, the
    running batch is compacted to the next power of two holding its live rows whenever that halves it,
    so a tail of a few long rows does not pay for every slot (at most log2(slots) more decode programs).
    progress(k) is called as k more requests complete."""
    n_rows = len(requests) * num_samples
    slots = slot_count(n_rows, max_rows, num_samples, mesh)
    capacity, block = capacity_and_block(requests, buckets, block_size)
    refill_rows = max(num_samples, refill_rows or slots // 16, 1)
    stats = stats if stats is not None else EngineStats()
    stats.slots, stats.capacity = slots, capacity

    state = empty_state_fn(config, slots, capacity, mesh)
    if mesh is None:  # committed like every later state, so the first refill reuses the same compilation
        state = jax.device_put(state, next(iter(jax.tree.leaves(params)[0].devices())))
    waiting = collections.deque(range(len(requests)))
    free = list(range(slots))
    owner: list[_Row | None] = [None] * slots
    results: list[Sample | None] = [None] * n_rows
    unfinished = [num_samples] * len(requests)
    seed32 = np.uint32(seed % 2**32)

    while waiting or len(free) < slots:
        while waiting and len(free) >= num_samples:  # refill
            group = [waiting.popleft() for _ in range(_group_size(min(len(waiting), len(free) // num_samples)))]
            P = bucket_length(max(len(requests[i].prompt_ids) for i in group), buckets)
            tokens = np.zeros((len(group), P), np.int32)
            for g, i in enumerate(group):
                tokens[g, :len(requests[i].prompt_ids)] = requests[i].prompt_ids
            lengths = np.asarray([len(requests[i].prompt_ids) for i in group], np.int32)
            limits = np.asarray([requests[i].max_new_tokens for i in group], np.int32)
            taken, free = free[:len(group) * num_samples], free[len(group) * num_samples:]
            row_ids = np.asarray([requests[i].index * num_samples + j for i in group for j in range(num_samples)],
                                 np.uint32)
            state = prefill_fn(config, num_samples, mesh, params, state, *(_place(a, mesh) for a in (
                tokens, lengths, limits, np.asarray(taken, np.int32), seed32, row_ids)))
            for r, slot in enumerate(taken):
                owner[slot] = _Row(group[r // num_samples], r % num_samples)
            stats.prefills += len(group)
            stats.prefill_calls += 1

        if not waiting:
            live = [slot for slot, o in enumerate(owner) if o is not None]
            size = compacted_size(len(live), len(owner), mesh)
            if size is not None:
                keep = live + free[:size - len(live)]  # free slots pad it: done, limit 0
                state = compact_fn(mesh, state, _place(np.asarray(keep, np.int32), mesh))
                owner = [owner[slot] for slot in keep]
                free = list(range(len(live), size))
                stats.compactions += 1
        slots = len(owner)
        stop_at_done = len(free) + refill_rows if waiting else slots
        before = np.asarray([0 if o is None else len(o.tokens) for o in owner])
        state, emitted = decode_fn(config, settings, chunk, block, mesh, params, state,
                                   _place(np.int32(stop_at_done), mesh))
        tokens, logp, slogp, generated, done = distributed.fetch(
            (emitted.tokens, emitted.logprobs, emitted.sampling_logprobs, state.num_generated, state.done))
        stats.decode_calls += 1
        new = np.where([o is not None for o in owner], generated - before, 0)
        stats.decode_steps += int(new.max(initial=0))
        stats.computed_row_steps += int(new.max(initial=0)) * slots
        stats.live_row_steps += int(new.sum())
        completed = 0
        for slot, row in enumerate(owner):
            if row is None:
                continue
            k = int(new[slot])
            row.tokens.extend(tokens[slot, :k].tolist())
            row.logprobs.extend(logp[slot, :k].tolist())
            row.sampling_logprobs.extend(slogp[slot, :k].tolist())
            if done[slot]:
                results[row.request * num_samples + row.sample] = make_sample(
                    settings, row.tokens, row.logprobs, row.sampling_logprobs, tokenizer)
                owner[slot] = None
                free.append(slot)
                unfinished[row.request] -= 1
                completed += unfinished[row.request] == 0
        if progress is not None and completed:
            progress(completed)
    return results
