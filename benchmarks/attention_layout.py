"""The CPU engine's two attention formulations against the ones they replaced, in one process: run
milliseconds (median of 7 calls, interleaved) and the largest difference of the outputs.

- decode: the "rows" path's cached attention (each row reading its own window of the stacked cache) as
  two matrix products against block-diagonal queries (`qwen2._prefix_attention`), against the
  elementwise product summed over the head dimension it replaced; timed as a whole `decode_step`
  (qwen2-40m, float32, 64 rows with cached prefixes of 64-600 positions) and as the attention alone at
  the head shapes of larger models (`--shapes`).
- prefill: a packed prefill pass with its causal attention head-major (`qwen2._causal_attention`),
  against the same query blocks in the token-major layout it replaced (8 x 512 and 2 x 512 packs).

    .venv/bin/python benchmarks/attention_layout.py
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rrm_jax.model import qwen2
from rrm_jax.model.config import preset

# (name, layers, rows, cache length, kv heads, query heads per kv head, head dim): the attention alone
SHAPES = [
    ("qwen2-40m heads, 64 rows", 8, 64, 768, 2, 4, 64),
    ("1.5B heads (K 2, G 6, H 128), 16 rows", 4, 16, 1024, 2, 6, 128),
    ("7B heads (K 4, G 7, H 128), 16 rows", 4, 16, 1024, 4, 7, 128),
    ("32B heads (K 8, G 5, H 128), 16 rows", 4, 16, 1024, 8, 5, 128),
]


def elementwise_prefix(q_blocks, cache_k, cache_v, layer, lengths, window, row=0):
    """The decode attention before: an elementwise product summed over H (same inputs and outputs as
    `qwen2._prefix_attention`; the queries read back off the block diagonal)."""
    n = q_blocks.shape[0]
    _, _, _, K, H = cache_k.shape
    G = q_blocks.shape[2] // K
    blocks = q_blocks.reshape(n, K, H, K, G)
    qf = jnp.stack([blocks[:, k, :, k, :] for k in range(K)], axis=1).transpose(0, 1, 3, 2)[:, None]  # [n,1,K,G,H]
    at, size = (layer, row, 0, 0, 0), (1, n, window, K, H)
    k = jax.lax.dynamic_slice(cache_k, at, size)[0].astype(jnp.float32)
    v = jax.lax.dynamic_slice(cache_v, at, size)[0].astype(jnp.float32)
    s = jnp.sum(qf * k[:, :, :, None, :], axis=-1)
    valid = (jnp.arange(window)[None, :] < lengths[:, None])[:, :, None, None]
    s = jnp.where(valid, s, -1e30)
    m = jnp.max(s, axis=1)
    p = jnp.where(valid, jnp.exp(s - m[:, None]), 0.0)
    return m, jnp.sum(p, axis=1), jnp.sum(p[..., None] * v[:, :, :, None, :], axis=1)


def token_major_attention(q, k, v, mask, dtype):
    """The prefill attention before: the same causal query blocks, each product on the token-major
    layout [B, T, K, G, H] x [B, S, K, H]."""
    B, T, N, H = q.shape
    K = k.shape[2]
    parts = []
    for start, end in qwen2.causal_query_blocks(T):
        qb = q[:, start:end].reshape(B, end - start, K, N // K, H)
        s = jnp.einsum("btkgh,bskh->bkgts", qb, k[:, :end], preferred_element_type=jnp.float32) * (H**-0.5)
        p = jax.nn.softmax(jnp.where(mask[:, None, None, start:end, :end], s, -1e30), axis=-1)
        out = jnp.einsum("bkgts,bskh->btkgh", p.astype(dtype), v[:, :end])
        parts.append(out.reshape(B, end - start, N, H))
    return jnp.concatenate(parts, axis=1)


def compare(label, variants: dict, args, reps: int = 7):
    """variants: name -> a function of args, traced while `setup()` has installed that variant."""
    compiled, outputs = {}, {}
    for name, (setup, fn) in variants.items():
        setup()  # a fresh function each time: JAX reuses a traced function's trace, which would skip the variant
        compiled[name] = jax.jit(lambda *a, fn=fn: fn(*a)).lower(*args).compile()
        outputs[name] = jax.block_until_ready(compiled[name](*args))
    times = {name: [] for name in compiled}
    for _ in range(reps):
        for name, fn in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    first, *rest = outputs.values()
    diff = max(float(jnp.max(jnp.abs(jnp.asarray(o) - jnp.asarray(first)))) for o in rest)
    cells = ", ".join(f"{name} {1e3 * np.median(t):.1f} ms" for name, t in times.items())
    (before, after) = (np.median(t) for t in times.values())
    print(f"{label}: {cells} ({after / before:.2f}x); largest difference {diff:.1e}", flush=True)


def main():
    blocked, elementwise = qwen2._prefix_attention, elementwise_prefix
    use = lambda prefix: lambda: setattr(qwen2, "_prefix_attention", prefix)
    rng = np.random.default_rng(0)

    config = preset("qwen2-40m")
    params = qwen2.Qwen2(config, rngs=nnx.Rngs(0)).params()
    B, S = 64, 768
    shape = (config.num_layers, B, S, config.num_kv_heads, config.head_dim)
    cache = qwen2.KVCache(
        jnp.asarray(rng.standard_normal(shape), jnp.float32),
        jnp.asarray(rng.standard_normal(shape), jnp.float32),
        jnp.asarray(rng.integers(64, 600, B), jnp.int32),
    )
    tokens = jnp.asarray(rng.integers(3, config.vocab_size, B), jnp.int32)
    step = lambda p, t, c: qwen2.decode_step(config, p, t, c, block_size=128, row_windows=True)[0]
    compare(
        "decode step, qwen2-40m, 64 rows of 64-600 cached positions",
        {"elementwise": (use(elementwise), step), "block-diagonal products": (use(blocked), step)},
        (params, tokens, cache),
    )

    for label, L, B, S, K, G, H in SHAPES:
        shape = (L, B, S, K, H)
        cache = qwen2.KVCache(
            jnp.asarray(rng.standard_normal(shape), jnp.float32),
            jnp.asarray(rng.standard_normal(shape), jnp.float32),
            jnp.asarray(rng.integers(64, S - 100, B), jnp.int32),
        )
        q = jnp.asarray(rng.standard_normal((B, 1, K * G, H)), jnp.float32)
        k_new = jnp.asarray(rng.standard_normal((B, 1, K, H)), jnp.float32)
        windows = qwen2.fine_attention_windows(S, 128)

        def attention(q, k_new, c, L=L, windows=windows):
            index = qwen2.row_window_indices(c.lengths, jnp.ones(c.lengths.shape, bool), windows)
            return jnp.stack(
                [qwen2._attend_cached(q, k_new, k_new, c, i, windows, index, jnp.float32) for i in range(L)]
            )

        compare(
            f"decode attention alone, {label}, {L} layers",
            {"elementwise": (use(elementwise), attention), "block-diagonal products": (use(blocked), attention)},
            (q, k_new, cache),
        )
    qwen2._prefix_attention = blocked

    head_major = qwen2._causal_attention
    use = lambda attention: lambda: setattr(qwen2, "_causal_attention", attention)
    for rows in (8, 2):
        row_len, half = 512, 256
        tokens = rng.integers(3, config.vocab_size, (rows, row_len))
        segments = np.repeat(np.arange(2 * rows), half).reshape(rows, row_len)
        positions = np.tile(np.arange(half), 2 * rows).reshape(rows, row_len)
        last = np.arange(half - 1, rows * row_len, half)
        args = (params, *(jnp.asarray(a, jnp.int32) for a in (tokens, segments, positions, last)))
        prefill = lambda p, *x: qwen2.prefill_packed(config, p, *x)[0]
        compare(
            f"packed prefill, qwen2-40m, {rows} x {row_len} (two prompts a row)",
            {"token-major": (use(token_major_attention), prefill), "head-major": (use(head_major), prefill)},
            args,
        )
    qwen2._causal_attention = head_major


if __name__ == "__main__":
    main()
