"""Continuous-batching generation engine: a fixed set of slots (rows decoding at once), refilled with
waiting prompts as rows finish, decoding in chunks of decode steps (CHUNK_STEPS) between host checks.

The host loop is plain Python over a few jitted programs:

    empty_state_fn  allocate the slots and their KV cache;
    unstack_fn      split the stacked layer weights into one array per layer (the "layers" path, once
                    per `generate` call);
    prefill_fn      prefill a pack of waiting prompts (several prompts in one token budget, each
                    attending only to itself) once and write their KV for their samples' slots;
    decode_fn       run a chunk of decode steps for every slot (finished slots idle) and return the
                    tokens;
    compact_fn      once no prompt waits, gather the live rows into a smaller running batch;
    retire_fn       stop rows preempted for their pages (paged cache).

Two decode paths, chosen by `decode_path`:

    "rows"    one CPU device: a contiguous stacked cache [L, B, S, K, H] (S = capacity: the longest
              prompt's bucket plus the largest limit), layers scanned, each row reading the smallest
              window that holds its own prefix (a loop over the rows, cheap on a CPU), and the chunk of
              decode steps a while loop that returns early once enough slots are free for a refill;
    "layers"  accelerators and meshes: one cache array per layer and the layers unrolled, the chunk of
              decode steps a scan of a fixed length (finished rows masked), so a step holds no
              conditional and no loop of unknown trip count (each costs a host round trip on XLA:GPU).
              The cache is paged: per layer a pool of pages [K, num_pages, P, H] read in place through
              a page table (`paged_attention`: a Pallas kernel on GPU and TPU, an XLA gather of the
              pages a window chosen on the host holds elsewhere), its bookkeeping on the host
              (`rrm_jax.pages`, one pool per batch shard; the table goes to each call as an argument).
              Rows take pages as they grow (`grow`, before each chunk), a prompt's samples share its
              full pages, and under memory pressure the youngest row is preempted and its sample
              recomputed (the recompute policy; `generate`'s docstring). `paged=False` keeps a
              contiguous [K, B, S, H] cache per layer read by `decode_attention.attend` instead.

Rows keep their own random streams (see `rrm_jax.sampling`), so results do not depend on the slot, the
slot count, the other requests, their order or the path.

The programs' stages carry `jax.named_scope` labels (prefill, decode_step, and inside the model embed,
norm, qkv, rope, attention, attn_out, mlp, cache_write, logits, then sampling), so a profile of
`rrm-jax bench` names each piece.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import os
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rrm_jax import distributed, parallel
from rrm_jax.errors import UserError
from rrm_jax.model import decode_attention, paged_attention, qwen2
from rrm_jax.model.config import Qwen2Config
from rrm_jax.pages import PAGE_SIZE, Placement, ShardedPagePool, pool_floor
from rrm_jax.sampling import (
    MIN_BUCKET,
    Sample,
    SamplingSettings,
    bucket_length,
    is_eos,
    make_sample,
    next_tokens,
    row_keys,
)
from rrm_jax.sizes import batch_shards, next_power_of_two, round_up

ATTENTION_BLOCK = 128  # window granularity: the "rows" path's finest window, the "layers" XLA path's smallest
CHUNK_STEPS = 32  # decode steps per device call between host checks: one "chunk" of this module
# Prompt tokens per row of a prefill pack: waiting prompts are packed into rows of this budget (a longer
# prompt gets a power-of-two pack of its own), so one program serves every prompt length and a 520-token
# prompt does not pay for 1,024. A CPU prefers short rows (the attention inside a row grows with its
# square); a call takes up to PREFILL_ROWS rows, a power of two of them.
PREFILL_TOKENS = {"cpu": 512}
DEFAULT_PREFILL_TOKENS = 2048
# Rows of the budget one prefill call may take (per batch shard), a power of two: an accelerator wants a
# burst of short prompts in one call to fill its compute; a CPU's matmuls are near their rate on one row
# of 512 already (7% more time a position than at 8 rows), so there one row a call saves compiling the
# ladder's 3 other programs (1.0-1.8 s each on the short-request workload).
PREFILL_ROWS = {"cpu": 1}
DEFAULT_PREFILL_ROWS = 8
PACK_LOOKAHEAD = 64  # waiting prompts a prefill row's best-fit packing looks through
# The tail's running batch halves at most this often (to a quarter of the slots): each size is one more
# decode program, and below a quarter the rows a halving drops save little next to the weights a step
# reads (on this CPU the third and fourth halvings of 64 slots saved 620 of 17,844 computed row-steps
# and cost 3.6 s to compile; not yet measured on a GPU or a TPU).
MAX_COMPACTIONS = 2
ATTENTION_ENV = "RRM_JAX_DECODE_ATTENTION"  # xla | pallas-gpu | pallas-tpu: overrides the backend's default


class SlotState(NamedTuple):
    """The running batch, one row per slot. A free slot is `done` with limit 0."""

    cache: qwen2.KVCache | qwen2.LayerCache | qwen2.PagedCache  # lengths [B]
    logits: jax.Array  # [B, V] float32: the distribution of each row's next token
    num_generated: jax.Array  # [B] int32
    limit: jax.Array  # [B] int32: the row's max_new_tokens
    done: jax.Array  # [B] bool
    think_end_index: jax.Array  # [B] int32: index into think_end_ids of the token to force next, -1 = none
    think_closed: jax.Array  # [B] bool
    keys: jax.Array  # [B, 2] uint32: raw PRNG key of the row's stream


class Emitted(NamedTuple):
    """What one decode_fn call generated: column t holds step t's token for every row that was live.
    Its own copies of the counts, so the host can read it after the state has gone into the next call."""

    tokens: jax.Array  # [B, chunk] int32
    logprobs: jax.Array  # [B, chunk] float32
    sampling_logprobs: jax.Array  # [B, chunk] float32
    count: jax.Array  # [B] int32: tokens each row generated in this call
    done: jax.Array  # [B] bool: rows finished by the end of this call


class Pack(NamedTuple):
    """Prompts packed for one prefill call (host arrays). R rows of T tokens, M prompt entries, each
    prompt's rows taking num_samples slots; padding entries point at slot B (out of range: dropped)."""

    tokens: np.ndarray  # [R, T] int32
    segments: np.ndarray  # [R, T] int32: the prompt entry of each token (padding: its own segment)
    positions: np.ndarray  # [R, T] int32: position of each token in its prompt
    token_slots: np.ndarray  # [R * T * num_samples] int32: where each token's key / value goes (per sample)
    token_positions: np.ndarray  # [R * T * num_samples] int32
    last: np.ndarray  # [M] int32: flat index of each prompt's last token
    lengths: np.ndarray  # [M] int32
    limits: np.ndarray  # [M] int32
    slots: np.ndarray  # [M * num_samples] int32, prompt-major
    row_ids: np.ndarray  # [M * num_samples] uint32: each row's stream
    # The paged cache's (empty for a contiguous one): where the prefill writes each prompt's KV, and the
    # copies of its partly filled last page to its other samples' rows (target -1: padding).
    prompt_pages: np.ndarray  # [M, ceil(T / page_size)] int32: global page ids, in position order
    copy_sources: np.ndarray  # [M * (num_samples - 1)] int32
    copy_targets: np.ndarray  # [M * (num_samples - 1)] int32


def prefill_rows(backend: str) -> int:
    """Rows of the token budget one prefill call may take on `backend`, per batch shard (PREFILL_ROWS)."""
    return PREFILL_ROWS.get(backend, DEFAULT_PREFILL_ROWS)


def decode_path(mesh) -> str:
    """ "rows" on one CPU device (a loop over the rows is cheap there and the cache reads are most of a
    step), else "layers" (an accelerator, where a row loop would serialise the device, or a mesh, where
    slicing one row out of the sharded batch would gather it)."""
    return "rows" if mesh is None and jax.default_backend() == "cpu" else "layers"


def attention_impl() -> str:
    """The decode attention of the "layers" path: RRM_JAX_DECODE_ATTENTION if set, else the backend's
    kernel (`decode_attention.default_impl`)."""
    impl = os.environ.get(ATTENTION_ENV) or decode_attention.default_impl()
    if impl not in decode_attention.IMPLS:
        raise UserError(f"{ATTENTION_ENV}={impl!r}: use one of {', '.join(decode_attention.IMPLS)}")
    return impl


def _constrain_cache(cache, mesh):
    if mesh is None:  # batch over (data, fsdp), kv heads over tp
        return cache
    if isinstance(cache, qwen2.PagedCache):  # pages over the batch shards with their rows (paged_attention)
        if not cache.keys:  # the per-row part alone (compaction)
            return cache
        pool = paged_attention.pool_sharding(mesh, cache.keys[0].shape)
        c = lambda a: jax.lax.with_sharding_constraint(a, pool)
        return cache._replace(keys=tuple(map(c, cache.keys)), values=tuple(map(c, cache.values)))
    if isinstance(cache, qwen2.LayerCache):
        kv = parallel.logical_sharding(("kv_heads", "batch", "length", "head_dim"), mesh, cache.keys[0].shape)
        c = lambda a: jax.lax.with_sharding_constraint(a, kv)
        return qwen2.LayerCache(tuple(map(c, cache.keys)), tuple(map(c, cache.values)), cache.lengths)
    kv = parallel.logical_sharding(("layers", "batch", "length", "kv_heads", "head_dim"), mesh, cache.keys.shape)
    return qwen2.KVCache(
        jax.lax.with_sharding_constraint(cache.keys, kv),
        jax.lax.with_sharding_constraint(cache.values, kv),
        cache.lengths,
    )


def _empty_state(config: Qwen2Config, slots: int, capacity: int, mesh, path: str, pool=None) -> SlotState:
    """pool: (num_pages, page_size) of a paged cache ("layers" path only), else a contiguous one."""
    if pool is not None:
        cache = qwen2.empty_paged_cache(config, slots, *pool)
    elif path == "layers":
        cache = qwen2.empty_layer_cache(config, slots, capacity)
    else:
        dt = jnp.dtype(config.dtype)
        shape = (config.num_layers, slots, capacity, config.num_kv_heads, config.head_dim)
        cache = qwen2.KVCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt), jnp.zeros(slots, jnp.int32))
    return SlotState(
        cache=_constrain_cache(cache, mesh),
        logits=jnp.zeros((slots, config.vocab_size), jnp.float32),
        num_generated=jnp.zeros(slots, jnp.int32),
        limit=jnp.zeros(slots, jnp.int32),
        done=jnp.ones(slots, bool),
        think_end_index=jnp.full(slots, -1, jnp.int32),
        think_closed=jnp.zeros(slots, bool),
        keys=jnp.zeros_like(jax.random.key_data(row_keys(0, jnp.zeros(slots, jnp.uint32)))),
    )


def _prefill_insert(
    config: Qwen2Config, num_samples: int, mesh, params, state: SlotState, pack: Pack, seed
) -> SlotState:
    """Prefill the prompts of `pack` once each and insert each prompt's cache into its num_samples slots
    (a paged cache: into its pages, once); row r of the pack samples from the stream of pack.row_ids[r]."""
    with jax.named_scope("prefill"):
        logits, keys, values = qwen2.prefill_packed(
            config, params, pack.tokens, pack.segments, pack.positions, pack.last
        )
    if isinstance(state.cache, qwen2.PagedCache):
        cache = _write_prompt_pages(state.cache, pack, keys, values, mesh)
    else:
        if num_samples > 1:  # token-major, then sample: as the host laid out token_slots
            keys, values = jnp.repeat(keys, num_samples, axis=1), jnp.repeat(values, num_samples, axis=1)
        cache = qwen2.insert_tokens(state.cache, pack.token_slots, pack.token_positions, keys, values)
    logits = jnp.repeat(logits, num_samples, axis=0)
    lengths, limits = jnp.repeat(pack.lengths, num_samples), jnp.repeat(pack.limits, num_samples)
    slots = pack.slots
    put = lambda dst, src: dst.at[slots].set(src, mode="drop")
    cache = cache._replace(lengths=put(cache.lengths, lengths))
    return SlotState(
        cache=_constrain_cache(cache, mesh),
        logits=put(state.logits, logits),
        num_generated=put(state.num_generated, jnp.zeros_like(lengths)),
        limit=put(state.limit, limits),
        done=put(state.done, jnp.zeros(lengths.shape, bool)),
        think_end_index=put(state.think_end_index, jnp.full(lengths.shape, -1, jnp.int32)),
        think_closed=put(state.think_closed, jnp.zeros(lengths.shape, bool)),
        keys=put(state.keys, jax.random.key_data(row_keys(seed, pack.row_ids))),
    )


@jax.named_scope("cache_write")
def _write_prompt_pages(cache: qwen2.PagedCache, pack: Pack, keys, values, mesh) -> qwen2.PagedCache:
    """A packed prefill's keys / values [L, R * T, K, H] into each prompt's pages, then its partly filled
    last page copied to its other samples' pages."""
    M = pack.lengths.shape[0]
    segments = jnp.where(pack.segments < M, pack.segments, -1).reshape(-1)  # padding: written nowhere
    positions = pack.positions.reshape(-1)
    new_keys, new_values = [], []
    for layer, (k_pages, v_pages) in enumerate(zip(cache.keys, cache.values)):
        k_pages, v_pages = paged_attention.write_prompt(
            k_pages, v_pages, pack.prompt_pages, segments, positions, keys[layer], values[layer], mesh=mesh
        )
        if pack.copy_targets.shape[0]:
            k_pages, v_pages = paged_attention.copy_pages(
                k_pages, v_pages, pack.copy_sources, pack.copy_targets, mesh=mesh
            )
        new_keys.append(k_pages)
        new_values.append(v_pages)
    return cache._replace(keys=tuple(new_keys), values=tuple(new_values))


def _sample_step(settings: SamplingSettings, s: SlotState):
    """The next token of every row from its logits -> (NextTokens, active, num_generated, done)."""
    nxt = next_tokens(
        settings, s.logits, jax.random.wrap_key_data(s.keys), s.num_generated, s.think_end_index, s.think_closed
    )
    with jax.named_scope("sampling"):
        active = ~s.done
        num_generated = s.num_generated + active.astype(jnp.int32)
        done = s.done | (active & is_eos(settings, nxt.tokens)) | (num_generated >= s.limit)
    return nxt, active, num_generated, done


def _decode_chunk(
    config: Qwen2Config,
    settings: SamplingSettings,
    chunk: int,
    block: int,
    attention: str | None,
    mesh,
    params,
    state: SlotState,
    stop_at_done,
    page_table=None,
):
    """`chunk` decode steps. attention None: the "rows" path (params stacked, a while loop that stops
    early when every row is done or stop_at_done rows are); else the "layers" path (params unstacked, a
    fixed-length scan) with that `decode_attention` implementation, the XLA one reading the first
    `block` positions (chosen on the host to hold every row through the chunk). A paged cache reads and
    writes through page_table [B, R] with that `paged_attention` implementation, the XLA one reading
    each row's first `block` pages."""
    if isinstance(state.cache, qwen2.PagedCache):
        attend = lambda q, k_pages, v_pages, lengths: paged_attention.attend_paged(
            q, k_pages, v_pages, lengths, page_table, impl=attention, pages_read=block, mesh=mesh
        )
        write = lambda k_pages, v_pages, positions, k_new, v_new, active: paged_attention.write_token(
            k_pages, v_pages, page_table, positions, k_new, v_new, active, mesh=mesh
        )
    elif attention is not None:
        attend = functools.partial(decode_attention.attend, impl=attention, window=block, mesh=mesh)
        write = qwen2.write_rows
    if attention is not None:

        def layers_step(s: SlotState, _):
            nxt, active, num_generated, done = _sample_step(settings, s)
            with jax.named_scope("decode_step"):
                logits, cache = qwen2.decode_step_layers(
                    config, params, nxt.tokens, s.cache, active=active, attend=attend, write=write
                )
            s = SlotState(
                _constrain_cache(cache, mesh),
                logits,
                num_generated,
                s.limit,
                done,
                nxt.think_end_index,
                nxt.think_closed,
                s.keys,
            )
            return s, (nxt.tokens, nxt.logprobs, nxt.sampling_logprobs)

        start = state.num_generated
        state, out = jax.lax.scan(layers_step, state, None, length=chunk)
        return state, Emitted(*(a.T for a in out), state.num_generated - start, state.done)

    B = state.done.shape[0]
    start = state.num_generated
    emitted = Emitted(
        jnp.zeros((B, chunk), jnp.int32),
        jnp.zeros((B, chunk), jnp.float32),
        jnp.zeros((B, chunk), jnp.float32),
        start,
        state.done,
    )

    def go_on(carry):
        s, _, t = carry
        n_done = jnp.sum(s.done.astype(jnp.int32))
        return (t < chunk) & (n_done < B) & (n_done < stop_at_done)

    def step(carry):
        s, e, t = carry
        nxt, active, num_generated, done = _sample_step(settings, s)
        e = e._replace(
            tokens=e.tokens.at[:, t].set(nxt.tokens),
            logprobs=e.logprobs.at[:, t].set(nxt.logprobs),
            sampling_logprobs=e.sampling_logprobs.at[:, t].set(nxt.sampling_logprobs),
        )
        with jax.named_scope("decode_step"):
            logits, cache = qwen2.decode_step(
                config, params, nxt.tokens, s.cache, active=active, block_size=block, row_windows=True
            )
        s = SlotState(cache, logits, num_generated, s.limit, done, nxt.think_end_index, nxt.think_closed, s.keys)
        return s, e, t + 1

    state, emitted, _ = jax.lax.while_loop(go_on, step, (state, emitted, jnp.zeros((), jnp.int32)))
    return state, emitted._replace(count=state.num_generated - start, done=state.done)


def _compact(mesh, state: SlotState, keep) -> SlotState:
    """The slot state of the rows in `keep` [n] (slot indices) only: every per-slot array gathered along
    its batch axis, so the decode steps that follow compute n rows instead of all the slots."""
    return SlotState(
        _constrain_cache(qwen2.take_rows(state.cache, keep), mesh),
        state.logits[keep],
        state.num_generated[keep],
        state.limit[keep],
        state.done[keep],
        state.think_end_index[keep],
        state.think_closed[keep],
        state.keys[keep],
    )


def _retire(state: SlotState, rows) -> SlotState:
    """The rows of the mask `rows` [B] finished: they stop writing (their pages go to other rows)."""
    return state._replace(done=state.done | rows, limit=jnp.where(rows, 0, state.limit))


# Compiled once per (config, shapes, static settings); parameters and the slot state are arguments, and
# the state is donated so the cache is updated in place.
empty_state_fn = jax.jit(_empty_state, static_argnums=(0, 1, 2, 3, 4, 5))
prefill_fn = jax.jit(_prefill_insert, static_argnums=(0, 1, 2), donate_argnums=(4,))
decode_fn = jax.jit(_decode_chunk, static_argnums=(0, 1, 2, 3, 4, 5), donate_argnums=(7,))
compact_fn = jax.jit(_compact, static_argnums=(0,))  # no donation: the output is smaller than the input
retire_fn = jax.jit(_retire, donate_argnums=(0,))
unstack_fn = jax.jit(qwen2.unstack_layers)


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
    path: str = ""  # decode_path: "rows" or "layers"
    attention: str = ""  # the "layers" path's decode attention
    prefills: int = 0  # prompts prefilled: once each, but a paged cache prefills again for preempted or later samples
    prefill_calls: int = 0
    prefill_tokens: int = 0  # token positions the prefill calls computed (prompts + padding)
    decode_calls: int = 0
    decode_steps: int = 0
    live_row_steps: int = 0  # sum over steps of the rows generating
    computed_row_steps: int = 0  # sum over steps of the rows the step computed (the running batch's size)
    live_kv_positions: int = 0  # sum over steps of the positions the live rows hold (the KV a step must read)
    compactions: int = 0
    peak_concurrent_rows: int = 0  # the most rows live at once
    # the decode steps run while prompts waited, when the slots (or pages) held all the rows they could
    waiting_decode_steps: int = 0
    waiting_live_row_steps: int = 0
    # The paged cache's ("layers" path; 0 for a contiguous one)
    page_size: int = 0
    pool_pages: int = 0  # the pool's pages, every shard's null page included
    peak_pages_in_use: int = 0
    preemptions: int = 0  # rows preempted to free pages, their samples recomputed from the prompt

    @property
    def occupancy(self) -> float:
        """The fraction of the computed rows that generated a token."""
        return self.live_row_steps / max(1, self.computed_row_steps)

    @property
    def rows_while_waiting(self) -> float:
        """Rows generating per decode step while prompts waited: how many the cache sustains."""
        return self.waiting_live_row_steps / max(1, self.waiting_decode_steps)


def slot_count(n_rows: int, max_rows: int | None, num_samples: int, mesh) -> int:
    """Slots for n_rows rows: all of them, rounded up to a power of two (so varied request counts share
    compilations), but at most max_rows (and at least one prompt's samples); a multiple of the mesh's
    batch shards."""
    n = next_power_of_two(n_rows)
    if max_rows is not None:
        n = min(n, max(max_rows, num_samples))
    return round_up(n, batch_shards(mesh))


def capacity_and_block(requests: Sequence[Request], buckets=None, block_size: int = ATTENTION_BLOCK):
    """KV positions per slot and the attention block: room for the longest prompt's bucket plus the largest
    limit (a function of buckets and limits only, so similar calls share compilations), rounded up to a
    whole number of blocks."""
    need = bucket_length(max(len(r.prompt_ids) for r in requests), buckets) + max(r.max_new_tokens for r in requests)
    block = min(block_size, next_power_of_two(need))
    return round_up(need, block), block


def host_window(longest: int, chunk: int, block: int, capacity: int) -> int:
    """The positions the "layers" XLA attention reads in a chunk: the smallest of block, 2 x block, ...,
    capacity that holds the longest live row after `chunk` more tokens (a row grows by at most one token
    a step), so the choice is made once per chunk on the host and never on the device."""
    window = block
    while window < min(capacity, longest + chunk):
        window *= 2
    return min(window, capacity)


def compacted_size(live: int, slots: int, mesh, start_slots: int) -> int | None:
    """The smaller running batch for `live` rows once no prompt waits: the power of two that holds them
    (a multiple of the mesh's batch shards), but not below a quarter of the `start_slots` the call began
    with (MAX_COMPACTIONS), when that is at most half of the running batch's `slots`; else None."""
    shards = batch_shards(mesh)
    size = round_up(max(next_power_of_two(live), shards, start_slots >> MAX_COMPACTIONS), shards)
    return size if size * 2 <= slots else None


def pack_prompts(
    requests: Sequence[Request],
    waiting: collections.deque,
    free: list[int],
    *,
    num_samples: int,
    budget: int,
    rows: int,
    slots: int,
    row_multiple: int = 1,
    buckets=None,
    placement: Placement | None = None,
) -> tuple[Pack, list[int], list[int]]:
    """Take waiting prompts into one pack of up to `rows` rows of `budget` tokens (as many prompts as the
    free slots hold, at most budget / MIN_BUCKET a row; a prompt never straddles two rows). Each row starts
    with the first waiting prompt and is then filled best-fit: the longest of the next PACK_LOOKAHEAD
    waiting prompts that fits the space left, until none does (prefill is compute-bound, so a row's
    padding costs as much as its tokens; taking prompts strictly in order left a third of each row empty).
    The pack has a power of two of rows (a multiple of row_multiple, the mesh's batch shards): prompts
    filling rows beyond the largest power of two wait for the next call, so no row is empty, a refill of a
    few prompts computes one row, a burst of short prompts a few, and a run compiles at most
    log2(rows) + 1 prefill programs, plus up to 3 for a one-row pack, which is only as long as its prompts
    need, in quarters of the budget. A prompt longer than the budget gets a one-row pack of its own, its
    power-of-two bucket long. Returns (pack, the requests taken, the slots their rows took). Pops from
    `waiting` and `free`.

    placement (a paged cache): a prompt is taken only if `placement.take` finds it pages and rows (the
    first waiting prompt must fit), and the pack's rows are the slots it admits, perhaps only some of a
    request's samples (its pack entry's other rows are padding)."""
    per_row = budget // MIN_BUCKET
    taken: list[int] = []
    starts: list[int] = []  # flat index of each taken prompt's first token
    row, used, in_row = 0, 0, 0
    length = lambda i: len(requests[i].prompt_ids)
    if placement is None:
        room = lambda n: (n + 1) * num_samples <= len(free)
    else:  # rows and pages are the placement's to check; a pack has at most slots / num_samples entries
        room = lambda n: n < max(1, slots // num_samples)
    while waiting and room(len(taken)):
        if in_row == 0:  # a row starts with the first waiting prompt
            if length(waiting[0]) > budget:
                break
            k = 0
        else:
            k = _best_fit(waiting, length, budget - used) if in_row < per_row else None
            if k is None:  # nothing fits the row's space: the next row
                if row + 1 == rows:
                    break
                row, used, in_row = row + 1, 0, 0
                continue
        i = waiting[k]
        if placement is not None and not placement.take(i):
            break
        del waiting[k]
        starts.append(row * budget + used)
        taken.append(i)
        used, in_row = used + length(i), in_row + 1
    T = budget
    rows_used = row + 1 if used else row
    R = 1 << max(0, rows_used.bit_length() - 1)  # the power of two at or below: its rows are full
    while taken and starts[-1] >= R * budget:  # prompts of the rows beyond wait for the next call
        waiting.appendleft(taken.pop())
        starts.pop()
    R = min(rows, round_up(R, row_multiple))
    if R == 1 and taken:  # one row (a refill after a row or two finished): only as long as its prompts need,
        # in quarters of the budget, so a lone 300-token prompt computes 384 positions, not 512
        quarter = max(MIN_BUCKET, budget // 4)
        T = min(budget, round_up(starts[-1] + length(taken[-1]), quarter))
    if not taken:  # the first waiting prompt is longer than the budget
        if placement is not None and not placement.take(waiting[0]):
            raise ValueError("the first waiting prompt does not fit the page pool; check before packing")
        taken.append(waiting.popleft())
        starts.append(0)
        R, T = 1, bucket_length(len(requests[taken[0]].prompt_ids), buckets)
    max_prompts = max(1, min(slots // num_samples, R * max(T, budget) // MIN_BUCKET))
    if placement is None:
        taken_slots = [free.pop(0) for _ in range(len(taken) * num_samples)]
    else:
        placed = placement.commit(len(taken))
        taken_slots = [slot for p in placed for slot in p.slots]
        for slot in taken_slots:
            free.remove(slot)
    tokens = np.zeros(R * T, np.int32)
    segments = np.full(R * T, max_prompts, np.int32)  # padding: a segment no prompt has
    positions = np.zeros(R * T, np.int32)
    token_prompt = np.full(R * T, -1)
    last, lengths, limits = (np.zeros(max_prompts, np.int32) for _ in range(3))
    for j, (i, at) in enumerate(zip(taken, starts)):
        ids = requests[i].prompt_ids
        n = len(ids)
        tokens[at : at + n], segments[at : at + n], positions[at : at + n] = ids, j, np.arange(n)
        token_prompt[at : at + n] = j
        last[j], lengths[j], limits[j] = at + n - 1, n, requests[i].max_new_tokens
    row_slots = np.full(max_prompts * num_samples, slots, np.int32)  # padding entries: out of range
    row_ids = np.zeros(max_prompts * num_samples, np.uint32)
    if placement is None:
        row_slots[: len(taken_slots)] = taken_slots
        row_ids[: len(taken_slots)] = [requests[i].index * num_samples + s for i in taken for s in range(num_samples)]
        prompt_pages = np.zeros((max_prompts, 0), np.int32)
        copy_sources = copy_targets = np.zeros(0, np.int32)
    else:
        prompt_pages = np.zeros((max_prompts, -(-T // placement.kv.page_size)), np.int32)
        copy_sources = np.zeros(max_prompts * (num_samples - 1), np.int32)
        copy_targets = np.full(max_prompts * (num_samples - 1), -1, np.int32)
        copies = 0
        for j, (i, p) in enumerate(zip(taken, placed)):
            for s, slot in zip(p.samples, p.slots):  # sample s's row sits at s in its entry, as its logits
                row_slots[j * num_samples + s] = slot
                row_ids[j * num_samples + s] = requests[i].index * num_samples + s
            pages = p.pages
            prompt_pages[j, : len(pages.prefill_pages)] = pages.prefill_pages
            m = len(pages.copy_targets)
            copy_sources[copies : copies + m], copy_targets[copies : copies + m] = (
                pages.copy_sources,
                pages.copy_targets,
            )
            copies += m
    token_slots = np.where(
        (token_prompt >= 0)[:, None],
        row_slots[np.maximum(token_prompt, 0)[:, None] * num_samples + np.arange(num_samples)],
        slots,
    )
    pack = Pack(
        tokens.reshape(R, T),
        segments.reshape(R, T),
        positions.reshape(R, T),
        token_slots.reshape(-1).astype(np.int32),
        np.repeat(positions, num_samples).astype(np.int32),
        last,
        lengths,
        limits,
        row_slots,
        row_ids,
        prompt_pages,
        copy_sources,
        copy_targets,
    )
    return pack, taken, taken_slots


def _best_fit(waiting: collections.deque, length, space: int) -> int | None:
    """Index in `waiting` of the longest of its first PACK_LOOKAHEAD prompts of at most `space` tokens (the
    first such on ties), or None."""
    best, best_len = None, 0
    for k, i in enumerate(itertools.islice(waiting, PACK_LOOKAHEAD)):
        n = length(i)
        if best_len < n <= space:
            best, best_len = k, n
            if n == space:
                break
    return best


def _replicate(x, mesh):
    """A host array replicated over the mesh (every process passes the same value); unchanged without a mesh."""
    if mesh is None:
        return x
    return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))


class _HostRow:
    """The host's record of one generating row: whose sample it is and what it has generated so far."""

    __slots__ = ("request", "sample", "prompt_len", "limit", "tokens", "logprobs", "sampling_logprobs", "finished")

    def __init__(self, request: int, sample: int, prompt_len: int, limit: int):
        self.request, self.sample, self.prompt_len, self.limit = request, sample, prompt_len, limit
        self.tokens, self.logprobs, self.sampling_logprobs = [], [], []
        self.finished = False

    @property
    def length(self) -> int:
        """Positions the row's KV holds once every dispatched chunk is read."""
        return self.prompt_len + len(self.tokens)


def page_pool(requests: Sequence[Request], slots: int, capacity: int, shards: int, kv_pages, page_size: int):
    """The host side of a paged cache for `slots` rows over `shards` batch shards: kv_pages pages (default:
    the contiguous cache's slots x capacity positions, plus each shard's null page, so every row can reach
    its longest length at once and nothing is ever preempted), a page table as wide as a capacity-long
    row needs, rounded up to whole compute blocks of the GPU kernel."""
    per_row = -(-capacity // page_size)
    width = round_up(per_row, max(1, paged_attention.GPU_BLOCK // page_size))
    rows = slots // shards
    per_shard = rows * per_row + 1 if kv_pages is None else kv_pages // shards
    longest = max(len(r.prompt_ids) + r.max_new_tokens for r in requests)
    if per_shard < pool_floor(longest, page_size):
        raise UserError(
            f"a KV pool of {per_shard} pages of {page_size} positions a batch shard (one is its null page) cannot "
            f"hold one row of {longest} positions; give it more pages or lower max_new_tokens"
        )
    return ShardedPagePool(shards, per_shard, page_size, width, rows)


def generate(
    config: Qwen2Config,
    settings: SamplingSettings,
    params,
    requests: Sequence[Request],
    *,
    num_samples: int = 1,
    seed: int = 0,
    max_rows: int | None = None,
    mesh=None,
    buckets=None,
    tokenizer=None,
    progress=None,
    block_size: int = ATTENTION_BLOCK,
    chunk: int = CHUNK_STEPS,
    refill_rows: int | None = None,
    prefill_tokens: int | None = None,
    path: str | None = None,
    paged: bool | None = None,
    kv_pages: int | None = None,
    page_size: int | None = None,
    stats: EngineStats | None = None,
) -> list[Sample]:
    """Generate num_samples continuations of every request with continuous batching. Returns them
    request-major (request i's samples at [i * num_samples, (i + 1) * num_samples)).

    max_rows: rows decoding at once, i.e. slots (default: all requests' rows, rounded up to a power of
    two). refill_rows: a "rows"-path decode call returns early once this many slots are free while
    prompts wait (default: a sixteenth of the slots, at least one prompt's samples). Once no prompt
    waits, the running batch is compacted to the next power of two holding its live rows whenever that
    halves it, down to a quarter of the slots, so a tail of a few long rows does not pay for every slot
    (at most MAX_COMPACTIONS = 2 more decode programs). prefill_tokens: the prefill pack's token budget
    (default per backend, PREFILL_TOKENS). path: "rows" or "layers" (default `decode_path(mesh)`).
    progress(k) is called as k more requests complete.

    paged: keep the KV cache as a pool of pages (default: on the "layers" path, the only one that runs
    it). Rows take pages as they grow and return them as they finish, a prompt's samples share its full
    pages, and a waiting prompt starts when the pool holds its prompt pages plus a margin for the running
    rows' growth; when the pool runs dry mid-decode, the youngest row is preempted and its sample
    recomputed later from its prompt, with the same tokens (`rrm_jax.pages`: the recompute policy).
    kv_pages: the pool's pages, all batch shards together, each shard's null page included (default:
    what the contiguous cache of the slots takes, so no row ever waits for a page); the slots then bound
    the rows live at once only when the pool holds them: give max_rows beyond kv_pages' worth of
    capacity-long rows to let the pages, not the longest possible row, set how many decode at once.
    page_size: positions a page (default PAGE_SIZE)."""
    run = _Generation(
        config,
        settings,
        params,
        requests,
        num_samples=num_samples,
        seed=seed,
        max_rows=max_rows,
        mesh=mesh,
        buckets=buckets,
        tokenizer=tokenizer,
        progress=progress,
        block_size=block_size,
        chunk=chunk,
        refill_rows=refill_rows,
        prefill_tokens=prefill_tokens,
        path=path,
        paged=paged,
        kv_pages=kv_pages,
        page_size=page_size,
        stats=stats if stats is not None else EngineStats(),
    )
    # On the "layers" path, once no prompt waits, a chunk stays in flight: the next one is dispatched
    # before its tokens are read, so the device never waits for the host (no refill or compaction
    # decision needs them; the calls are drained before either).
    in_flight: tuple[Emitted, list] | None = None
    while run.waiting or run.busy():
        if in_flight is None:
            run.refill()
            if not run.waiting:
                run.compact()
        if not run.grow(in_flight is not None):
            # The page pool ran dry with a chunk in flight: read it first, since a row is preempted only
            # once no dispatched chunk can still write its pages; then refill and grow again.
            run.read(*in_flight)
            in_flight = None
            continue
        emitted, snapshot = run.dispatch_decode(in_flight is not None)
        if in_flight is not None:
            run.read(*in_flight)  # while the chunk just dispatched runs
            in_flight = None
        if run.keeps_chunk_in_flight():
            in_flight = (emitted, snapshot)
        else:
            run.read(emitted, snapshot)
    return run.results


class _Generation:
    """The host side of one `generate` call, in stages: `refill` prefills waiting prompts into free slots,
    `compact` shrinks the running batch once no prompt waits, `grow` gives the rows of a paged cache the
    pages the next chunk writes (preempting the youngest when the pool is dry), `dispatch_decode` starts a
    chunk of decode steps, `read` takes its tokens into the rows and frees the slots (and pages) of
    finished rows."""

    def __init__(
        self,
        config,
        settings,
        params,
        requests,
        *,
        num_samples,
        seed,
        max_rows,
        mesh,
        buckets,
        tokenizer,
        progress,
        block_size,
        chunk,
        refill_rows,
        prefill_tokens,
        path,
        paged,
        kv_pages,
        page_size,
        stats: EngineStats,
    ):
        self.config, self.settings, self.params, self.requests = config, settings, params, requests
        self.num_samples, self.mesh, self.buckets, self.chunk = num_samples, mesh, buckets, chunk
        self.tokenizer, self.progress, self.stats = tokenizer, progress, stats
        n_rows = len(requests) * num_samples
        self.start_slots = slots = slot_count(n_rows, max_rows, num_samples, mesh)
        self.capacity, self.block = capacity_and_block(requests, buckets, block_size)
        self.refill_rows = max(num_samples, refill_rows or slots // 16, 1)
        backend = jax.default_backend()
        budget = prefill_tokens or PREFILL_TOKENS.get(backend, DEFAULT_PREFILL_TOKENS)
        self.shards = batch_shards(mesh)  # pack rows: a multiple of them
        # Rows only as long as this call's longest prompt needs (a power of two up to the budget), and as
        # many more of them: the attention inside a row costs its length squared, so short prompts get
        # short rows; a prefill call holds at most PREFILL_ROWS x budget tokens.
        self.row_len = min(budget, bucket_length(max(len(r.prompt_ids) for r in requests)))
        self.pack_rows = self.shards * prefill_rows(backend) * (budget // self.row_len)
        self.path = path or decode_path(mesh)
        self.attention = attention_impl() if self.path == "layers" else None
        self.paged = self.path == "layers" if paged is None else paged
        if self.paged and self.path != "layers":
            raise UserError('the paged KV cache runs on the "layers" decode path; pass path="layers"')
        if not self.paged and (kv_pages is not None or page_size is not None):
            raise UserError("kv_pages and page_size size a paged KV cache, which this call does not use")
        stats.slots, stats.capacity, stats.path, stats.attention = slots, self.capacity, self.path, self.attention or ""

        pool = None
        if self.paged:
            P = page_size or PAGE_SIZE
            self.kv = page_pool(requests, slots, self.capacity, self.shards, kv_pages, P)
            pool = (self.kv.num_pages, P)
            stats.page_size, stats.pool_pages = P, self.kv.num_pages
        self.state = empty_state_fn(config, slots, self.capacity, mesh, self.path, pool)
        if mesh is None:  # committed like every later state, so the first refill reuses the same compilation
            self.state = jax.device_put(self.state, next(iter(jax.tree.leaves(params)[0].devices())))
        self.decode_params = unstack_fn(params) if self.path == "layers" else params
        self.waiting = collections.deque(range(len(requests)))
        self.pending = {i: list(range(num_samples)) for i in range(len(requests))}  # samples still to start
        self.free = list(range(slots))
        self.owner: list[_HostRow | None] = [None] * slots
        self.results: list[Sample | None] = [None] * n_rows
        self.unfinished = [num_samples] * len(requests)
        self.seed32 = np.uint32(seed % 2**32)

    def busy(self) -> bool:
        """Whether any slot holds a row that has not finished."""
        return len(self.free) < len(self.owner)

    def _placement(self) -> Placement:
        ahead = 2 * self.chunk  # what a row may write in a chunk and the one in flight
        margin = [0] * len(self.kv.pools)
        for slot, row in enumerate(self.owner):
            if row is not None:
                need = self.kv.pools[0].pages_for(min(row.length + ahead, row.prompt_len + row.limit))
                margin[self.kv.shard_of(slot)[0]] += max(0, need - self.kv.held(slot))
        return Placement(self.kv, self.free, self.pending, self.requests, margin, ahead)

    def _can_start(self, request: int) -> bool:
        if self.paged:
            return self._placement().take(request)
        return len(self.free) >= self.num_samples

    def refill(self) -> None:
        """Prefill waiting prompts, a pack per call, while free slots (and pages) hold the next one's samples."""
        stats, num_samples = self.stats, self.num_samples
        while self.waiting and self._can_start(self.waiting[0]):
            pack, taken, _ = pack_prompts(
                self.requests,
                self.waiting,
                self.free,
                num_samples=num_samples,
                budget=self.row_len,
                rows=self.pack_rows,
                slots=len(self.owner),
                row_multiple=self.shards,
                buckets=self.buckets,
                placement=self._placement() if self.paged else None,
            )
            for i in reversed(taken):  # samples the pool could not hold yet wait at the front
                if self.pending[i] and self.paged:
                    self.waiting.appendleft(i)
            for r, slot in enumerate(pack.slots[: len(taken) * num_samples].tolist()):
                if slot < len(self.owner):  # sample r % num_samples of the r // num_samples-th prompt
                    request = self.requests[taken[r // num_samples]]
                    row = _HostRow(
                        taken[r // num_samples], r % num_samples, len(request.prompt_ids), request.max_new_tokens
                    )
                    self.owner[slot] = row
            pack = Pack(*(_replicate(a, self.mesh) for a in pack))
            self.state = prefill_fn(
                self.config,
                num_samples,
                self.mesh,
                self.params,
                self.state,
                pack,
                _replicate(self.seed32, self.mesh),
            )
            stats.prefills += len(taken)
            stats.prefill_calls += 1
            stats.prefill_tokens += pack.tokens.size
        stats.peak_concurrent_rows = max(stats.peak_concurrent_rows, len(self.owner) - len(self.free))
        self._note_pages()

    def _compaction(self) -> list[int] | None:
        """The slots a compacted running batch keeps (the live rows, padded with free slots to the power of
        two holding them, at least a quarter of the starting slots), when that halves the batch or more;
        else None. A paged cache compacts each batch shard alike, since a shard's rows hold only its
        pages."""
        if not self.paged:
            live = [slot for slot, o in enumerate(self.owner) if o is not None]
            size = compacted_size(len(live), len(self.owner), self.mesh, self.start_slots)
            return None if size is None else live + self.free[: size - len(live)]
        per_shard = len(self.owner) // self.shards
        shards = [range(s * per_shard, (s + 1) * per_shard) for s in range(self.shards)]
        live = [[slot for slot in rows if self.owner[slot] is not None] for rows in shards]
        size = compacted_size(max(map(len, live)), per_shard, None, self.start_slots // self.shards)
        if size is None:
            return None
        idle = [[slot for slot in rows if self.owner[slot] is None] for rows in shards]
        return [slot for mine, spare in zip(live, idle) for slot in mine + spare[: size - len(mine)]]

    def compact(self) -> None:
        """Gather the live rows into a running batch of half the slots or less, when they fit in one. A paged
        cache's pages stay where they are: only the rows' state and page-table rows move."""
        keep = self._compaction()
        if keep is None:
            return
        at = _replicate(np.asarray(keep, np.int32), self.mesh)
        if self.paged:
            cache = self.state.cache
            rows_only = self.state._replace(cache=cache._replace(keys=(), values=()))
            state = compact_fn(self.mesh, rows_only, at)
            self.state = state._replace(cache=state.cache._replace(keys=cache.keys, values=cache.values))
            self.kv.keep_rows(keep)
        else:
            self.state = compact_fn(self.mesh, self.state, at)
        self.owner = [self.owner[slot] for slot in keep]  # free slots pad it: done, limit 0
        self.free = [slot for slot, o in enumerate(self.owner) if o is None]
        self.stats.compactions += 1

    def grow(self, chunk_in_flight: bool) -> bool:
        """A paged cache's pages for every live row through the chunk about to be dispatched (and the one in
        flight). When the pool runs dry: with a chunk in flight, False (it must be read first); without,
        the youngest rows are preempted until the others fit."""
        if not self.paged:
            return True
        rows = [slot for slot, o in enumerate(self.owner) if o is not None]
        ahead = self.chunk * (2 if chunk_in_flight else 1)
        lengths = [min(self.owner[r].length + ahead, self.owner[r].prompt_len + self.owner[r].limit) for r in rows]
        if chunk_in_flight:
            short = self.kv.ensure(rows, lengths)
            self._note_pages()
            return not short
        self._preempt(self.kv.grow(rows, lengths))
        self._note_pages()
        return True

    def _preempt(self, slots: list[int]) -> None:
        """Requeue preempted rows' samples at the front of the waiting queue, to be recomputed from their
        prompt (a sample's tokens depend only on seed, prompt and sample), and stop the rows on the device."""
        if not slots:
            return
        for slot in slots:
            row = self.owner[slot]
            self.owner[slot] = None
            self.free.append(slot)
            if not self.pending[row.request]:
                self.waiting.appendleft(row.request)
            self.pending[row.request] = sorted([*self.pending[row.request], row.sample])
        stopped = np.zeros(len(self.owner), bool)
        stopped[slots] = True
        self.state = retire_fn(self.state, _replicate(stopped, self.mesh))
        self.stats.preemptions = self.kv.preemptions

    def _note_pages(self) -> None:
        if self.paged:
            self.stats.peak_pages_in_use = self.kv.peak_pages_in_use

    def dispatch_decode(self, another_in_flight: bool) -> tuple[Emitted, list]:
        """Start a chunk of decode steps; returns what it will emit and the slots' owners at dispatch. Its
        outputs start copying to the host at once, each behind the chunk, so none waits for the others."""
        slots = len(self.owner)
        stop_at_done = len(self.free) + self.refill_rows if self.waiting else slots
        # The XLA attention reads a window (positions; a paged cache: the pages holding them) that holds
        # the longest row by the end of this chunk and the one in flight; a kernel reads each row's own
        # length, and the window only names its program (the block, or a paged cache's whole table).
        page_table, window, read_all = None, self.block, self.capacity
        if self.paged:
            page_table = _replicate(self.kv.page_table(), self.mesh)
            window = read_all = self.kv.pools[0].max_pages_per_row
        if self.attention == "xla":
            longest = max((o.length for o in self.owner if o is not None), default=0)
            ahead = self.chunk * (2 if another_in_flight else 1)
            window = host_window(longest, ahead, self.block, self.capacity)
            if self.paged:
                window = -(-window // self.kv.page_size)
        snapshot = list(self.owner)
        self.state, emitted, self.attention = _decode(
            self.config,
            self.settings,
            self.chunk,
            window,
            self.attention,
            self.mesh,
            self.decode_params,
            self.state,
            _replicate(np.int32(stop_at_done), self.mesh),
            read_all,
            self.stats,
            page_table,
        )
        for a in emitted:
            if a.is_fully_addressable:
                a.copy_to_host_async()
        return emitted, snapshot

    def keeps_chunk_in_flight(self) -> bool:
        """Whether the chunk just dispatched may be read after the next one starts: on the "layers" path,
        once no prompt waits and no compaction is due (both need its tokens first)."""
        live = sum(o is not None for o in self.owner)
        return self.path == "layers" and not self.waiting and live > 0 and self._compaction() is None

    def read(self, emitted: Emitted, snapshot: list) -> None:
        """The host's side of one decode call: its tokens appended to the rows of `snapshot` (the slots'
        owners when it was dispatched), finished rows turned into results and their slots (and pages)
        freed."""
        stats, num_samples = self.stats, self.num_samples
        tokens, logp, slogp, count, done = distributed.gather_to_host(tuple(emitted))
        count = np.where([o is not None for o in snapshot], count, 0)
        steps = self.chunk if self.path == "layers" else int(count.max(initial=0))  # a "layers" chunk runs every step
        stats.decode_calls += 1
        stats.decode_steps += steps
        stats.computed_row_steps += steps * len(snapshot)
        stats.live_row_steps += int(count.sum())
        if self.waiting:  # as when it was dispatched: a chunk is kept in flight only once none waits
            stats.waiting_decode_steps += steps
            stats.waiting_live_row_steps += int(count.sum())
        completed = 0
        for slot, row in enumerate(snapshot):
            if row is None or row.finished:  # finished in the call before (read after this one was dispatched)
                continue
            k = int(count[slot])
            held = row.length
            stats.live_kv_positions += k * held + k * (k - 1) // 2
            row.tokens.extend(tokens[slot, :k].tolist())
            row.logprobs.extend(logp[slot, :k].tolist())
            row.sampling_logprobs.extend(slogp[slot, :k].tolist())
            if done[slot]:
                self.results[row.request * num_samples + row.sample] = make_sample(
                    self.settings, row.tokens, row.logprobs, row.sampling_logprobs, self.tokenizer
                )
                row.finished = True
                self.owner[slot] = None
                self.free.append(slot)
                if self.paged:  # no chunk dispatched later writes it: the row was done in this one
                    self.kv.release(slot)
                self.unfinished[row.request] -= 1
                completed += self.unfinished[row.request] == 0
        if self.progress is not None and completed:
            self.progress(completed)


class FixedBatch(NamedTuple):
    """The engine's programs on one batch of equal prompts, for benchmarks: `state()` prefills a fresh
    slot state, `decode(state)` runs `steps` decode steps in one call."""

    state: callable
    decode: callable


def fixed_batch(
    config: Qwen2Config,
    settings: SamplingSettings,
    params,
    tokens,
    steps: int,
    capacity: int,
    block: int,
    path: str | None = None,
) -> FixedBatch:
    """Prompts tokens [B, P] (all of length P), each limited to `steps` new tokens, on the decode path
    this device takes (or `path`)."""
    B, P = tokens.shape
    path = path or decode_path(None)
    attention = attention_impl() if path == "layers" else None
    decode_params = unstack_fn(params) if path == "layers" else params
    reqs = [Request(list(t), steps, i) for i, t in enumerate(np.asarray(tokens))]

    def state():
        s = empty_state_fn(config, B, capacity, None, path)
        pack, _, _ = pack_prompts(
            reqs, collections.deque(range(B)), list(range(B)), num_samples=1, budget=P, rows=B, slots=B
        )
        return prefill_fn(config, 1, None, params, s, pack, np.uint32(0))

    def decode(s):
        return decode_fn(
            config,
            settings,
            steps,
            capacity if attention == "xla" else block,
            attention,
            None,
            decode_params,
            s,
            np.int32(B),
        )

    return FixedBatch(state, decode)


def _decode(
    config, settings, chunk, window, attention, mesh, params, state, stop_at_done, read_all, stats, page_table=None
):
    """decode_fn, falling back from a Pallas attention kernel to XLA (with a warning) when the kernel
    does not compile on this device; the failure comes from compilation, before the donated state is
    consumed; the XLA attention then reads `read_all` (the capacity, or a paged cache's whole page
    table). Returns (state, emitted, the attention used)."""
    args = (mesh, params, state, stop_at_done, page_table)
    try:
        return (*decode_fn(config, settings, chunk, window, attention, *args), attention)
    except Exception as e:  # noqa: BLE001 - any lowering error of the kernel
        if attention in (None, "xla"):
            raise
        warnings.warn(
            f"decode attention {attention!r} failed to compile ({type(e).__name__}: {str(e)[:200]}); "
            f"using the XLA attention (set {ATTENTION_ENV}=xla to skip the attempt)",
            stacklevel=3,
        )
        stats.attention = "xla"
        return (*decode_fn(config, settings, chunk, read_all, "xla", *args), "xla")
