"""Paged decode attention (rrm_jax.model.paged_attention): every implementation against a NumPy softmax
over each row's keys rebuilt from its page table, with shuffled pages, a null page and unowned pages of
NaN, and large stale values past each row's length; the page writes and copies against NumPy edits of
the pool; a mesh against one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rrm_jax import parallel
from rrm_jax.model import paged_attention as paged

K, G, H, P, R = 2, 3, 32, 16, 16  # kv heads, queries per kv head, head dim, page size, pages a row
LENGTHS = [1, P - 1, P, P + 1, 50, 200]  # one position, inside, on and across a page edge, several pages
B = len(LENGTHS)


def _pages_needed(length: int) -> int:
    return -(-length // P)


def _pool(rng, lengths=LENGTHS, shards: int = 1, pages_per_shard: int = 32):
    """k_pages, v_pages [K, shards * pages_per_shard, P, H] and a page table [B, R]. Shard s's rows (the
    s-th block of rows) own shuffled pages of its range; its first page is its null page, which pads its
    rows' tables. The null pages and unowned pages hold NaN; past each row's length inside its last page
    sit large finite values (a previous owner's)."""
    num_pages = shards * pages_per_shard
    k_pages = np.full((K, num_pages, P, H), np.nan, np.float32)
    v_pages = np.full((K, num_pages, P, H), np.nan, np.float32)
    table = np.zeros((len(lengths), R), np.int32)
    per_shard = len(lengths) // shards
    for s in range(shards):
        free = list(rng.permutation(np.arange(s * pages_per_shard + 1, (s + 1) * pages_per_shard)))
        for b in range(s * per_shard, (s + 1) * per_shard):
            owned = [free.pop() for _ in range(_pages_needed(lengths[b]))]
            table[b] = s * pages_per_shard
            table[b, : len(owned)] = owned
            for pages in (k_pages, v_pages):
                pages[:, owned] = rng.normal(size=(K, len(owned), P, H))
                tail = lengths[b] - (len(owned) - 1) * P  # positions of the last page that are the row's
                pages[:, owned[-1], tail:] = 1e4 * rng.normal(size=(K, P - tail, H))
    return k_pages, v_pages, table


def _contiguous(pages, table, b: int, length: int):
    """Row b's first `length` positions rebuilt from its pages: [K, length, H]."""
    return np.concatenate([pages[:, p] for p in table[b, : _pages_needed(length)]], axis=1)[:, :length]


def _numpy_attention(q, k_pages, v_pages, lengths, table):
    q = np.asarray(q, np.float64)
    out = np.zeros(q.shape)
    for b, n in enumerate(lengths):
        k, v = (_contiguous(np.asarray(p, np.float64), table, b, n) for p in (k_pages, v_pages))
        for h in range(q.shape[1]):
            s = k[h // G] @ q[b, h] / np.sqrt(H)
            p = np.exp(s - s.max())
            out[b, h] = p @ v[h // G] / p.sum()
    return out


def _inputs(dtype=jnp.float32, shards: int = 1, pages_per_shard: int = 32):
    rng = np.random.default_rng(0)
    k_pages, v_pages, table = _pool(rng, shards=shards, pages_per_shard=pages_per_shard)
    q = rng.normal(size=(B, K * G, H))
    want = _numpy_attention(q, k_pages, v_pages, LENGTHS, table)
    args = (
        *(jnp.asarray(a, dtype) for a in (q, k_pages, v_pages)),
        jnp.asarray(LENGTHS, jnp.int32),
        jnp.asarray(table),
    )
    return args, want


def test_xla_attention_equals_a_numpy_softmax_over_each_rows_pages():
    args, want = _inputs()
    got = paged.attend_paged(*args, impl="xla")
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, want, atol=1e-5)
    # reading only the pages the longest row needs (the host's choice) gives the same
    got = paged.attend_paged(*args, impl="xla", pages_read=_pages_needed(max(LENGTHS)))
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("impl,dtype,atol", [("pallas-gpu", jnp.float32, 1e-5), ("pallas-tpu", jnp.bfloat16, 2e-2)])
def test_kernels_in_interpret_mode_equal_the_reference(impl, dtype, atol):
    """The kernels load whole compute blocks of pages (the GPU one 8 pages in 2 splits here, the TPU one
    all 16), so a short row's block reaches past its pages into the NaN null page. The TPU kernel
    computes in bfloat16, so it is compared on bfloat16 inputs."""
    args, want = _inputs(dtype)
    got = paged.attend_paged(*args, impl=impl, interpret=True)
    assert got.shape == args[0].shape and got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=atol)


def test_kernel_blocks_fit_every_page_size_and_capacity_the_engine_uses():
    assert paged.gpu_blocks(R, P) == (2, 8)
    assert paged.tpu_pages_per_block(R, P) == 16
    assert paged.tpu_pages_per_block(72, 128) == 4  # 9,216 positions in pages of 128
    for page_size in (16, 32, 64, 128):
        for capacity in range(128, 20000, 128):
            pages_per_row = capacity // page_size
            k_splits, per_block = paged.gpu_blocks(pages_per_row, page_size)
            assert per_block * page_size == paged.GPU_BLOCK and pages_per_row % (k_splits * per_block) == 0
            per_block = paged.tpu_pages_per_block(pages_per_row, page_size)
            assert per_block * page_size <= paged.TPU_BLOCK and pages_per_row % per_block == 0
    for page_size in (8, 24, 256):
        with pytest.raises(ValueError, match="power of two"):
            paged.gpu_blocks(64, page_size)


def test_write_token_puts_each_active_rows_key_in_its_page_and_slot():
    rng = np.random.default_rng(1)
    k_pages, v_pages = rng.normal(size=(2, K, 12, P, H)).astype(np.float32)
    table = np.asarray([[3, 7, 0], [5, 0, 0], [9, 2, 11], [4, 0, 0]], np.int32)
    positions = np.asarray([P, P - 1, 2 * P + 5, 0])  # first slot of page 2, last of page 1, ...
    active = np.asarray([True, True, True, False])
    k_new, v_new = rng.normal(size=(2, 4, K, H)).astype(np.float32)
    want_k, want_v = k_pages.copy(), v_pages.copy()
    for b in np.flatnonzero(active):
        page, slot = table[b, positions[b] // P], positions[b] % P
        want_k[:, page, slot], want_v[:, page, slot] = k_new[b], v_new[b]
    got_k, got_v = jax.jit(paged.write_token)(k_pages, v_pages, table, positions, k_new, v_new, active)
    np.testing.assert_array_equal(got_k, want_k)  # the inactive row's page 4 and the null page 0 unchanged
    np.testing.assert_array_equal(got_v, want_v)


def test_copy_pages_reads_the_pool_as_it_was_and_skips_padding():
    rng = np.random.default_rng(2)
    k_pages, v_pages = rng.normal(size=(2, K, 8, P, H)).astype(np.float32)
    src, dst = np.asarray([1, 3, 5]), np.asarray([3, 6, -1])  # page 3 is read and written; -1 pads
    got_k, got_v = paged.copy_pages(k_pages, v_pages, src, dst)
    for pages, got in ((k_pages, got_k), (v_pages, got_v)):
        want = pages.copy()
        want[:, 3], want[:, 6] = pages[:, 1], pages[:, 3]
        np.testing.assert_array_equal(got, want)


def test_prompt_written_shared_by_its_samples_then_decoded():
    """A packed prefill of two prompts (20 and 5 tokens, then padding) written into shuffled pages; the
    first prompt's two samples share its full page and each get a copy of its partial last page, then
    each writes its own next token there and attends over the prompt and that token."""
    rng = np.random.default_rng(3)
    num_pages = 10
    # the pool holds an earlier owner's values (finite, as anything the model wrote)
    k_before, v_before = 1e4 * rng.normal(size=(2, K, num_pages, P, H)).astype(np.float32)
    prompt_lengths = [20, 5]
    prompt_pages = np.asarray([[6, 2], [8, 0]], np.int32)
    segments = np.asarray([0] * 20 + [1] * 5 + [-1] * 7)
    positions = np.concatenate([np.arange(20), np.arange(5), np.zeros(7, int)])
    k_prompt, v_prompt = rng.normal(size=(2, len(segments), K, H)).astype(np.float32)

    k_pages, v_pages = paged.write_prompt(k_before, v_before, prompt_pages, segments, positions, k_prompt, v_prompt)
    for pages, before, new in ((k_pages, k_before, k_prompt), (v_pages, v_before, v_prompt)):
        for s, n in enumerate(prompt_lengths):  # each prompt's keys read back from its pages in order
            rows = np.flatnonzero(segments == s)
            np.testing.assert_array_equal(_contiguous(np.asarray(pages), prompt_pages, s, n), new[rows].swapaxes(0, 1))
        untouched = [0, 1, 3, 4, 5, 7, 9]  # the padding tokens wrote nowhere, page 0 included
        np.testing.assert_array_equal(np.asarray(pages)[:, untouched], before[:, untouched])

    # the samples' tables: the shared full page 6, then each its own copy (3, 5) of the partial page 2
    table = np.asarray([[6, 3, 0], [6, 5, 0]], np.int32)
    k_pages, v_pages = paged.copy_pages(k_pages, v_pages, np.asarray([2, 2]), np.asarray([3, 5]))
    k_new, v_new = rng.normal(size=(2, 2, K, H)).astype(np.float32)
    k_pages, v_pages = paged.write_token(k_pages, v_pages, table, np.asarray([20, 20]), k_new, v_new, np.ones(2, bool))
    q = rng.normal(size=(2, K * G, H)).astype(np.float32)
    lengths = np.asarray([21, 21], np.int32)
    got = paged.attend_paged(q, k_pages, v_pages, lengths, table, impl="xla")

    for b in range(2):  # the reference: the prompt's keys then the sample's own, contiguous
        k = np.concatenate([k_prompt[:20], k_new[b : b + 1]]).swapaxes(0, 1).astype(np.float64)
        v = np.concatenate([v_prompt[:20], v_new[b : b + 1]]).swapaxes(0, 1).astype(np.float64)
        for h in range(K * G):
            s = k[h // G] @ q[b, h] / np.sqrt(H)
            p = np.exp(s - s.max())
            np.testing.assert_allclose(got[b, h], p @ v[h // G] / p.sum(), atol=1e-5)


@pytest.mark.parametrize("shape,impls", [((2, 1, 2), ("xla", "pallas-gpu")), ((1, 2, 4), ("xla",))])
def test_mesh_equals_one_device(shape, impls):
    """Rows and their pages over 2 batch shards (data or fsdp), kv heads over tp (2 of them on tp=4:
    replicated). Each shard's rows use only its own pages."""
    mesh = parallel.make_mesh(*shape, devices=jax.devices()[: np.prod(shape)])
    args, want = _inputs(shards=2, pages_per_shard=24)
    q, k_pages, v_pages, lengths, table = args
    table = np.asarray(table)
    placed = [jax.device_put(pages, paged.pool_sharding(mesh, pages.shape)) for pages in (k_pages, v_pages)]
    assert placed[0].addressable_shards[0].data.shape[1] == 24  # one shard's pages
    for impl in impls:
        got = paged.attend_paged(q, *placed, lengths, table, impl=impl, mesh=mesh, interpret=True)
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=impl)

    rng = np.random.default_rng(4)
    k_new, v_new = rng.normal(size=(2, B, K, H)).astype(np.float32)
    positions = lengths - 1
    active = np.asarray([True, False, True, True, True, False])
    one = paged.write_token(k_pages, v_pages, table, positions, k_new, v_new, active)
    sharded = paged.write_token(k_pages, v_pages, table, positions, k_new, v_new, active, mesh=mesh)
    for a, b in zip(one, sharded):
        np.testing.assert_array_equal(a, b)

    # prompt tokens into both shards' pages (the first and last rows' pages), copies within each shard
    segments, token_positions = np.asarray([0, 0, 1, 1, -1]), np.asarray([0, 1, 0, 1, 0])
    prompt_pages = table[[0, B - 1]]
    one = paged.write_prompt(k_pages, v_pages, prompt_pages, segments, token_positions, k_new[:5], v_new[:5])
    sharded = paged.write_prompt(
        k_pages, v_pages, prompt_pages, segments, token_positions, k_new[:5], v_new[:5], mesh=mesh
    )
    for a, b in zip(one, sharded):
        np.testing.assert_array_equal(a, b)
    src, dst = np.asarray([table[0, 0], table[B - 1, 0], 0]), np.asarray([1, 25, -1])
    one = paged.copy_pages(k_pages, v_pages, src, dst)
    sharded = paged.copy_pages(k_pages, v_pages, src, dst, mesh=mesh)
    for a, b in zip(one, sharded):
        np.testing.assert_array_equal(a, b)
    assert np.array_equal(np.asarray(one[0])[:, 25], np.asarray(k_pages)[:, table[B - 1, 0]], equal_nan=True)
