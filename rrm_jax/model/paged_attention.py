"""Paged decode attention: the KV cache as a pool of fixed-size pages per layer, and a page table per row
naming the pages that hold its positions in order, read in place by the attention.

Layout, per layer: k_pages / v_pages [K, num_pages, P, H] (K kv heads, P positions a page), the layout
both maintained JAX kernels take as is. Position p of row b lives in page page_table[b, p // P], slot
p % P. A row owns its first ceil(length / P) table entries; the entries after them (a null page, or
anything) are never dereferenced: every call first points them at the row's own first page, since the
kernels load whole compute blocks of pages (the part past a row's length is masked, but a NaN loaded
there would still leak through the masked product). So only finite values may sit past a row's length
inside its own last page (stale values of an earlier owner are fine); other pages may hold anything.

    attend_paged(q, k_pages, v_pages, lengths, page_table, impl=..., pages_read=...) -> [B, N, H]
    write_token(k_pages, v_pages, page_table, positions, k_new, v_new, active) -> (k_pages, v_pages)
    write_prompt(k_pages, v_pages, prompt_pages, segment_ids, positions, k_new, v_new) -> (k_pages, v_pages)
    copy_pages(k_pages, v_pages, src, dst) -> (k_pages, v_pages)

Semantics as decode_attention.attend: q [B, N, H] with N = K * G (query head n reads kv head n // G),
lengths [B] include the new token (each >= 1). The writes are scatters that update the pool in place
when the caller's jit donates it. Implementations:

    "xla"         gathers each row's first `pages_read` pages (chosen on the host, >= every row's page
                  count) into a contiguous copy and runs decode_attention's XLA attention on it: the
                  reference, and the path for CPUs.
    "pallas-gpu"  jax.experimental.pallas.ops.gpu.paged_attention.paged_attention (Pallas-Triton).
    "pallas-tpu"  jax.experimental.pallas.ops.tpu.paged_attention.paged_attention (Mosaic).

What the kernels take (jax 0.10.2), which decides the engine's page size:

    GPU  paged_attention(q, k_pages, v_pages, block_tables [B, R] i32, lengths [B] i32, k_scales_pages=None,
         v_scales_pages=None, *, block_h=16, pages_per_compute_block=8, k_splits=16, num_warps=8,
         num_stages=2, interpret, debug, mask_value, attn_logits_soft_cap)
         - GQA: each kv head's G query heads are padded to block_h (a multiple of 16); no softmax scale
           argument (the queries are scaled here). Any float dtype; int8 / fp8 pages with per-position
           scales are optional.
         - R % k_splits == 0 and each split's pages a multiple of pages_per_compute_block. A row reads whole
           compute blocks up to the one holding its length; later splits are skipped.
         - Triton loads must have a power-of-two size: P, H and pages_per_compute_block powers of two,
           P * pages_per_compute_block >= 16 (a dot's minimum). Here: blocks of 128 positions (as the
           contiguous kernel), so P in {16, 32, 64, 128}.
         - Deprecated from JAX 0.11 with the whole Pallas-Triton backend (the Pallas changelog points to
           openxla/tokamax, which has no paged decode kernel that I could find); its import is confined
           to `_gpu_kernel`.
    TPU  paged_attention(q, k_pages, v_pages, lengths [B] i32, page_indices [B, R] i32, *, mask_value,
         attn_logits_soft_cap, pages_per_compute_block, megacore_mode=None | "batch" | "kv_head",
         inline_seq_dim=True)
         - R % pages_per_compute_block == 0; GQA any G; no softmax scale; keys and values are cast to
           bfloat16 inside (q stays float32), so results carry bfloat16 error; int8 pages optional.
         - Each page is one DMA into VMEM: a page [P, H] should be whole (8 | 16, 128) tiles, i.e. P a
           multiple of 16 for bfloat16 and H a multiple of 128 (JAX's own test: P 16-64, H 128/256,
           compute blocks of 512 positions; a recent JAX main skips that test for data races).
         - The whole page table is scalar-prefetched into SMEM, which is small: long rows of small pages
           overflow it (vLLM hit this and split the batch, vllm-project/vllm#9350), so TPU wants pages of
           64-128 positions. megacore_mode (v4 / v5p) is left off.
         - Not deprecated in JAX 0.11. jax.experimental.pallas.ops.tpu.ragged_paged_attention (mixed
           prefill + decode) takes another layout: kv_pages [num_pages, P, 2K, H], keys and values
           interleaved.

Mesh: rows and pages are sharded together over the batch axes (data x fsdp), kv heads over tp. Page ids
are global; shard s owns pages [s * n, (s + 1) * n), n = num_pages / shards, and the rows it holds use
only those (a prompt's sharing samples sit on one shard; a copy's source and target too). Each shard
attends and writes through its own slice; a write or copy aimed at another shard's page is dropped there.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from rrm_jax import parallel
from rrm_jax.model import decode_attention
from rrm_jax.sizes import batch_shards, next_power_of_two

IMPLS = decode_attention.IMPLS
GPU_BLOCK = 128  # positions per compute block of the GPU kernel
TPU_BLOCK = 512  # positions per compute block of the TPU kernel (JAX's own test's choice)


def gpu_blocks(pages_per_row: int, page_size: int) -> tuple[int, int]:
    """(k_splits, pages_per_compute_block) of the GPU kernel: compute blocks of GPU_BLOCK positions, and
    the most splits (<= 16) of a row's pages into whole blocks."""
    if page_size & (page_size - 1) or not 16 <= page_size <= GPU_BLOCK:
        raise ValueError(f"page size {page_size}: the GPU kernel needs a power of two in [16, {GPU_BLOCK}]")
    per_block = GPU_BLOCK // page_size
    if pages_per_row % per_block:
        raise ValueError(f"{pages_per_row} pages a row are not whole blocks of {per_block} pages")
    return next(s for s in (16, 8, 4, 2, 1) if pages_per_row % (s * per_block) == 0), per_block


def tpu_pages_per_block(pages_per_row: int, page_size: int) -> int:
    """pages_per_compute_block of the TPU kernel: the most pages (a power of two) in TPU_BLOCK positions
    that divides a row's pages."""
    per_block = 1 << (max(1, TPU_BLOCK // page_size).bit_length() - 1)
    while pages_per_row % per_block:
        per_block //= 2
    return per_block


def pool_sharding(mesh, shape) -> NamedSharding:
    """Where a layer's k_pages / v_pages [K, num_pages, P, H] live on a mesh: pages over the batch axes,
    kv heads over tp."""
    return NamedSharding(mesh, _pool_spec(mesh, shape))


@jax.named_scope("attention")
def attend_paged(
    q,
    k_pages,
    v_pages,
    lengths,
    page_table,
    *,
    impl: str = "xla",
    pages_read: int | None = None,
    mesh=None,
    interpret: bool = False,
):
    """q [B, N, H], k_pages / v_pages [K, num_pages, P, H], lengths [B], page_table [B, R] -> [B, N, H]
    in q's dtype.

    pages_read: the pages a row the "xla" path reads (>= ceil(length / P) of every row; default R); the
    kernels read each row's own length and ignore it. mesh: run on each shard (module docstring).
    interpret: run a Pallas kernel in interpret mode (CPU tests)."""
    if impl not in IMPLS:
        raise ValueError(f"attention {impl!r}: use one of {', '.join(IMPLS)}")
    run = {
        "xla": functools.partial(_xla, pages_read=pages_read or page_table.shape[1]),
        "pallas-gpu": functools.partial(_gpu, interpret=interpret),
        "pallas-tpu": functools.partial(_tpu, interpret=interpret),
    }[impl]
    lengths, page_table = lengths.astype(jnp.int32), page_table.astype(jnp.int32)
    if mesh is None:
        return run(q, k_pages, v_pages, lengths, page_table)
    pool, rows = _pool_spec(mesh, k_pages.shape), _row_spec(mesh, k_pages.shape, q.shape[0])
    q_spec = PartitionSpec(rows[0], pool[0], None)

    def shard(q, k_pages, v_pages, lengths, page_table):
        return run(q, k_pages, v_pages, lengths, page_table - _first_page(pool, k_pages.shape[1]))

    return jax.shard_map(
        shard, mesh=mesh, in_specs=(q_spec, pool, pool, rows, rows), out_specs=q_spec, check_vma=False
    )(q, k_pages, v_pages, lengths, page_table)


def write_token(k_pages, v_pages, page_table, positions, k_new, v_new, active, *, mesh=None):
    """Each active row's new key / value ([B, K, H]) into its page at `positions` [B] (page_table[b,
    pos // P], slot pos % P); inactive rows write nothing. -> (k_pages, v_pages)."""
    if mesh is None:
        segments = jnp.where(active, jnp.arange(page_table.shape[0]), -1)  # row b is its own segment
        return _scatter(k_pages, v_pages, page_table, segments, positions, k_new, v_new, first_page=0)
    pool, rows = _pool_spec(mesh, k_pages.shape), _row_spec(mesh, k_pages.shape, page_table.shape[0])
    new_spec = PartitionSpec(rows[0], pool[0], None)

    def shard(k_pages, v_pages, page_table, active, positions, k_new, v_new):
        local_segments = jnp.where(active, jnp.arange(page_table.shape[0]), -1)  # this shard's rows
        first = _first_page(pool, k_pages.shape[1])
        return _scatter(k_pages, v_pages, page_table, local_segments, positions, k_new, v_new, first_page=first)

    return jax.shard_map(
        shard,
        mesh=mesh,
        in_specs=(pool, pool, rows, rows, rows, new_spec, new_spec),
        out_specs=(pool, pool),
        check_vma=False,
    )(k_pages, v_pages, page_table, active, positions, k_new, v_new)


def write_prompt(k_pages, v_pages, prompt_pages, segment_ids, positions, k_new, v_new, *, mesh=None):
    """A packed prefill's keys / values ([T, K, H]) into pages: token t belongs to prompt segment_ids[t]
    (-1: padding, not written) at position positions[t] of it, and goes to prompt_pages[segment, pos //
    P], slot pos % P (prompt_pages [num_prompts, R]: each prompt's pages in order). -> (k_pages, v_pages)."""
    if mesh is None:
        return _scatter(k_pages, v_pages, prompt_pages, segment_ids, positions, k_new, v_new, first_page=0)
    pool = _pool_spec(mesh, k_pages.shape)
    new_spec = PartitionSpec(None, pool[0], None)  # every shard sees every token and keeps its own pages

    def shard(k_pages, v_pages, *tokens):
        return _scatter(k_pages, v_pages, *tokens, first_page=_first_page(pool, k_pages.shape[1]))

    replicated = PartitionSpec()
    return jax.shard_map(
        shard,
        mesh=mesh,
        in_specs=(pool, pool, replicated, replicated, replicated, new_spec, new_spec),
        out_specs=(pool, pool),
        check_vma=False,
    )(k_pages, v_pages, prompt_pages, segment_ids, positions, k_new, v_new)


def copy_pages(k_pages, v_pages, src, dst, *, mesh=None):
    """Page src[i] copied onto page dst[i] (both [n]; dst < 0: padding, nothing copied); every copy
    reads the pool as it was before the call. -> (k_pages, v_pages)."""
    if mesh is None:
        return _copy(k_pages, v_pages, src, dst, first_page=0)
    pool = _pool_spec(mesh, k_pages.shape)

    def shard(k_pages, v_pages, src, dst):
        return _copy(k_pages, v_pages, src, dst, first_page=_first_page(pool, k_pages.shape[1]))

    return jax.shard_map(
        shard,
        mesh=mesh,
        in_specs=(pool, pool, PartitionSpec(), PartitionSpec()),
        out_specs=(pool, pool),
        check_vma=False,
    )(k_pages, v_pages, src, dst)


def _own_pages(page_table, lengths, page_size: int):
    """Each row's table entries past its last page pointed at its first page (module docstring)."""
    owned = jnp.arange(page_table.shape[1])[None, :] < -(-lengths[:, None] // page_size)
    return jnp.where(owned, page_table, page_table[:, :1])


def _xla(q, k_pages, v_pages, lengths, page_table, *, pages_read: int):
    K, _, P, H = k_pages.shape
    B = q.shape[0]
    read = _own_pages(page_table[:, :pages_read], lengths, P)
    keys = k_pages[:, read].reshape(K, B, pages_read * P, H)  # [K, B, pages_read, P, H], contiguous per row
    values = v_pages[:, read].reshape(K, B, pages_read * P, H)
    return decode_attention.attend(q, keys, values, lengths, impl="xla")


def _scaled(q):
    """The kernels take no softmax scale: the queries carry it."""
    return (q.astype(jnp.float32) * q.shape[-1] ** -0.5).astype(q.dtype)


def _gpu_kernel():
    with warnings.catch_warnings():  # deprecated from JAX 0.11 (module docstring)
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import paged_attention
    return paged_attention.paged_attention


def _gpu(q, k_pages, v_pages, lengths, page_table, *, interpret: bool):
    K, _, P, _ = k_pages.shape
    k_splits, per_block = gpu_blocks(page_table.shape[1], P)
    return _gpu_kernel()(
        _scaled(q),
        k_pages,
        v_pages,
        _own_pages(page_table, lengths, P),
        lengths,
        block_h=max(16, next_power_of_two(q.shape[1] // K)),
        pages_per_compute_block=per_block,
        k_splits=k_splits,
        interpret=interpret,
    ).astype(q.dtype)


def _tpu(q, k_pages, v_pages, lengths, page_table, *, interpret: bool):
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

    P = k_pages.shape[2]
    run = functools.partial(paged_attention, pages_per_compute_block=tpu_pages_per_block(page_table.shape[1], P))
    args = (_scaled(q), k_pages, v_pages, lengths, _own_pages(page_table, lengths, P))
    if interpret:
        with pltpu.force_tpu_interpret_mode():
            return run(*args).astype(q.dtype)
    return run(*args).astype(q.dtype)


def _scatter(k_pages, v_pages, page_table, segments, positions, k_new, v_new, *, first_page):
    """Token t's key / value to page page_table[segments[t], positions[t] // P] (a global id; this slice
    holds pages first_page ...), slot positions[t] % P; tokens with segment < 0 or whose page is not in
    this slice write nothing."""
    K, n, P, H = k_pages.shape
    page = page_table[jnp.maximum(segments, 0), positions // P] - first_page
    keep = (segments >= 0) & (page >= 0) & (page < n)
    slots = jnp.where(keep, page * P + positions % P, n * P)  # n * P is out of range: dropped

    def put(pages, new):
        flat = (
            jnp.asarray(pages)
            .reshape(K, n * P, H)
            .at[:, slots]
            .set(new.swapaxes(0, 1).astype(pages.dtype), mode="drop")
        )
        return flat.reshape(pages.shape)

    return put(k_pages, k_new), put(v_pages, v_new)


def _copy(k_pages, v_pages, src, dst, *, first_page):
    n = k_pages.shape[1]
    src, dst = src - first_page, dst - first_page
    keep = (dst >= 0) & (dst < n) & (src >= 0) & (src < n)
    src, dst = jnp.where(keep, src, 0), jnp.where(keep, dst, n)  # page n is out of range: dropped
    k_pages, v_pages = jnp.asarray(k_pages), jnp.asarray(v_pages)
    return tuple(pages.at[:, dst].set(pages[:, src], mode="drop") for pages in (k_pages, v_pages))


def _pool_spec(mesh, shape) -> PartitionSpec:
    K, num_pages = shape[:2]
    shards = batch_shards(mesh)
    if num_pages % shards:
        raise ValueError(f"{num_pages} pages do not split over the mesh's {shards} batch shards")
    pages = parallel.logical_to_spec(("batch",), mesh, (num_pages,))[0]
    heads = parallel.logical_to_spec(("kv_heads",), mesh, (K,))[0]
    return PartitionSpec(heads, pages, None, None)


def _row_spec(mesh, pool_shape, rows: int) -> PartitionSpec:
    """Rows sharded as their pages are."""
    if rows % batch_shards(mesh):
        raise ValueError(f"{rows} rows do not split over the mesh's {batch_shards(mesh)} batch shards")
    return PartitionSpec(_pool_spec(mesh, pool_shape)[1])


def _first_page(pool_spec: PartitionSpec, pages_here: int):
    """The global id of this shard's first page (inside shard_map)."""
    axes = pool_spec[1]
    return 0 if axes is None else jax.lax.axis_index(axes) * pages_here
