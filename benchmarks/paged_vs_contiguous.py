"""Decode-step attention over a paged KV cache (pages gathered through a page table, as XLA must without
a fused paged-attention kernel) against the engine's contiguous per-slot cache read in blocks, on the
same filled lengths. One process, both timed back to back; CPU by default.

    .venv/bin/python benchmarks/paged_vs_contiguous.py [--preset qwen2-100m] [--batch 16] [--filled 1024]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from rrm_jax.bench import best_time
from rrm_jax.model import qwen2
from rrm_jax.model.config import preset


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen2-100m")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--filled", type=int, default=1024)
    ap.add_argument("--capacity", type=int, default=4096)
    ap.add_argument("--page", type=int, default=128)
    a = ap.parse_args()
    c = preset(a.preset)
    L, B, K, H, N = c.num_layers, a.batch, c.num_kv_heads, c.head_dim, c.num_heads
    block = a.page
    rng = jax.random.key(0)
    q = jax.random.normal(rng, (B, 1, N, H))
    k_new = v_new = jax.random.normal(rng, (B, 1, K, H))
    lengths = jnp.full((B,), a.filled, jnp.int32)

    # contiguous: [L, B, S, K, H], blocks up to the filled length
    cache = qwen2.KVCache(
        jax.random.normal(rng, (L, B, a.capacity, K, H)), jax.random.normal(rng, (L, B, a.capacity, K, H)), lengths
    )
    n_blocks = -(-a.filled // block)

    @jax.jit
    def contiguous(cache, q):
        def layer(_, i):
            return None, qwen2._attend_cached(q, k_new, v_new, cache, i, block, n_blocks, jnp.float32)

        return jax.lax.scan(layer, None, jnp.arange(L))[1]

    # paged: a pool of pages [L, P, page, K, H]; each row's page table lists its pages (shuffled, as a
    # paged cache allocates them); attention gathers the row's live pages, then attends over them.
    pages_per_row = a.capacity // a.page
    pool_pages = B * pages_per_row
    pool = (
        jax.random.normal(rng, (L, pool_pages, a.page, K, H)),
        jax.random.normal(rng, (L, pool_pages, a.page, K, H)),
    )
    table = jnp.asarray(np.random.default_rng(0).permutation(pool_pages).reshape(B, pages_per_row), jnp.int32)
    live = n_blocks  # pages that hold tokens

    @jax.jit
    def paged(pool, q):
        def layer(_, i):
            k = pool[0][i, table[:, :live]].reshape(B, live * a.page, K, H)  # the gather: a copy per layer per step
            v = pool[1][i, table[:, :live]].reshape(B, live * a.page, K, H)
            view = qwen2.KVCache(k[None], v[None], lengths)
            return None, qwen2._attend_cached(q, k_new, v_new, view, 0, live * a.page, 1, jnp.float32)

        return jax.lax.scan(layer, None, jnp.arange(L))[1]

    t_c, t_p = best_time(contiguous, cache, q, repeats=5), best_time(paged, pool, q, repeats=5)
    np.testing.assert_allclose(np.asarray(contiguous(cache, q)).shape, np.asarray(paged(pool, q)).shape)
    print(
        f"{a.preset} batch={B} filled={a.filled} capacity={a.capacity} page/block={a.page} "
        f"device={jax.devices()[0].device_kind}: attention over all layers, contiguous blocks "
        f"{t_c * 1e3:.1f} ms, paged gather {t_p * 1e3:.1f} ms ({t_p / t_c:.2f}x)"
    )


if __name__ == "__main__":
    main()
