"""The Qwen2 decoder (DeepSeek-R1-Distill-Qwen, RRM-7B / RRM-32B) in Flax NNX, readable top to bottom.

Parameters live on an `nnx.Module` with layers stacked along a leading [L] axis; the forward pass is a
pure function of a parameter dict (`forward`) that scans over the stacked layers, so compile time does
not grow with depth and jitted callers pass parameters as arguments instead of closing over them.
Every parameter is described once in `rrm_jax.model.weights` (its shape, its `logical_axes`, which
`rrm_jax.parallel` maps onto a device mesh, and how a fresh model draws it).

Besides the full-sequence pass (training, scoring, prefill), two decode steps over a KV cache: the
reference `decode_step` (one stacked cache, layers scanned; with per-row windows, the CPU engine's) and
`decode_step_layers` (one cache per layer, layers unrolled; accelerators). Each stage (embed, norm,
qkv, rope, attention, attn_out, mlp, cache_write, logits) runs under a `jax.named_scope` of that name,
so profiles and HLO dumps name it.

Shapes: B batch, T tokens, S cache length, L layers, D hidden, N query heads, K kv heads,
G = N // K query heads per kv head, H head dim, F MLP width, V vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from rrm_jax.model.config import INITIALIZERS, Qwen2Config
from rrm_jax.model.weights import (
    LOGICAL_AXES,
    Weight,
    param_shapes,  # noqa: F401 - qwen2.param_shapes, as before the table moved
    weights,
)

# Additive mask value: finite, so a fully masked row (a padding query) softmaxes to uniform instead of NaN.
_MASKED = -1e30


def _init_value(weight: Weight, c: Qwen2Config, dtype, key, init: str = "fan-in"):
    """A fresh model's value of one parameter (`weights` explains the two initializers)."""
    shape = weight.shape(c)
    if weight.init == "ones":
        return jnp.ones(shape, dtype)
    if weight.init == "zeros":
        return jnp.zeros(shape, dtype)
    std = 0.02 if init == "normal-0.02" else weight.fan_in_size(c) ** -0.5
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


class DecoderLayers(nnx.Module):
    """All decoder layers' weights, stacked along a leading [L] axis (scanned in `forward`)."""

    def __init__(self, values: dict[str, jax.Array]):
        for name, value in values.items():
            setattr(self, name, nnx.Param(value, logical_axes=LOGICAL_AXES[f"layers.{name}"]))


class Qwen2(nnx.Module):
    """Qwen2ForCausalLM. `logits = model(tokens, attention_mask=..., positions=...)` -> float32 [B, T, V]."""

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs, init: str = "fan-in"):
        """init: how random weights are drawn, one of INITIALIZERS."""
        if init not in INITIALIZERS:
            raise ValueError(f"init={init!r}: use one of {', '.join(INITIALIZERS)}")
        self.config = config
        dtype = jnp.dtype(config.param_dtype)
        values = {w.path: _init_value(w, config, dtype, rngs.params(), init) for w in weights(config)}
        self.embed = nnx.Param(values.pop("embed"), logical_axes=LOGICAL_AXES["embed"])
        self.final_norm = nnx.Param(values.pop("final_norm"), logical_axes=LOGICAL_AXES["final_norm"])
        if "lm_head" in values:
            self.lm_head = nnx.Param(values.pop("lm_head"), logical_axes=LOGICAL_AXES["lm_head"])
        self.layers = DecoderLayers({p.removeprefix("layers."): v for p, v in values.items()})

    def params(self) -> dict:
        """The raw parameter arrays as a nested dict (the argument of `forward`)."""
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))

    def __call__(self, tokens, *, attention_mask=None, positions=None):
        return forward(self.config, self.params(), tokens, attention_mask=attention_mask, positions=positions)


# ----------------------------------------------------------------------------------------------
# Pure functions of (config, params, inputs).


@jax.named_scope("norm")
def rms_norm(x, weight, eps):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * weight.astype(jnp.float32)).astype(x.dtype)


@jax.named_scope("rope")
def rope(x, positions, theta):
    """Rotary embedding, split-half convention (as HF's rotate_half). x [B, T, heads, H], positions [B, T]."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / x.shape[-1]))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def default_positions(attention_mask):
    """Running count of real tokens, so padding (left or right) never shifts a row's positions."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


@jax.named_scope("qkv")
def _qkv(c: Qwen2Config, p, x, positions):
    dt = x.dtype
    q = jnp.einsum("btd,dnh->btnh", x, p["q_proj"].astype(dt)) + p["q_bias"].astype(dt)
    k = jnp.einsum("btd,dkh->btkh", x, p["k_proj"].astype(dt)) + p["k_bias"].astype(dt)
    v = jnp.einsum("btd,dkh->btkh", x, p["v_proj"].astype(dt)) + p["v_bias"].astype(dt)
    return rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta), v


def _scores(q, k):
    """q [B, T, N, H], k [B, S, K, H] -> float32 scores [B, K, G, T, S]."""
    B, T, N, H = q.shape
    K = k.shape[2]
    q = q.reshape(B, T, K, N // K, H)
    return jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * (H**-0.5)


def _weighted_values(probs, v, dtype):
    """probs float32 [B, K, G, T, S], v [B, S, K, H] -> [B, T, N, H]."""
    B, K, G, T, _ = probs.shape
    out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(dtype), v)
    return out.reshape(B, T, K * G, v.shape[-1])


def _query_blocks(qf):
    """Scaled float32 queries [n, K, G, H] -> block-diagonal query matrices [n, K * H, K * G]: column
    (k, g) holds query head (k, g) in kv head k's H rows and zeros elsewhere."""
    n, K, G, H = qf.shape
    return jnp.einsum("nkgh,kj->nkhjg", qf, jnp.eye(K, dtype=qf.dtype)).reshape(n, K * H, K * G)


def _prefix_attention(q_blocks, cache_k, cache_v, layer, lengths, window: int, row=0):
    """Attention of one query per row over the first `window` positions of its cached prefix.

    q_blocks [n, K * H, K * G]: the rows row .. row + n - 1 of the batch, their scaled queries as
    `_query_blocks`; cache_k / cache_v: the whole cache [L, B, S, K, H], of which layer `layer` is read
    (sliced straight out of the stacked cache: slicing the layer first would copy all S positions);
    lengths [n] of those rows (positions < lengths are real, and must be <= window). Returns the
    softmax's pieces (max [n, K, G], normaliser [n, K, G], unnormalised output [n, K, G, H]), float32, so the new
    token's own score joins them exactly.

    Two matrix products over the cache in its own layout, each position's K heads read as one row of
    K * H: the scores against the block-diagonal queries, then the values weighted likewise with their
    cross-head blocks dropped. The zeros cost K times the multiplications, which one query a row leaves
    far below the reads. That streams the window once at about the memory's rate (a decode step is
    memory-bound): a product per kv head would make XLA's CPU backend copy each head's strided slice
    first, and the elementwise product summed over H that this replaced took 1.5x as long for a whole
    decode step of 64 rows (benchmarks/attention_layout.py)."""
    n = q_blocks.shape[0]
    _, _, _, K, H = cache_k.shape
    G = q_blocks.shape[2] // K
    at, size = (layer, row, 0, 0, 0), (1, n, window, K, H)
    k = jax.lax.dynamic_slice(cache_k, at, size)[0].astype(jnp.float32).reshape(n, window, K * H)
    v = jax.lax.dynamic_slice(cache_v, at, size)[0].astype(jnp.float32).reshape(n, window, K * H)
    s = jnp.einsum("nwc,ncq->nwq", k, q_blocks).reshape(n, window, K, G)
    valid = (jnp.arange(window)[None, :] < lengths[:, None])[:, :, None, None]
    s = jnp.where(valid, s, _MASKED)
    m = jnp.max(s, axis=1)
    p = jnp.where(valid, jnp.exp(s - m[:, None]), 0.0)
    out = jnp.einsum("nwq,nwc->nqc", p.reshape(n, window, K * G), v).reshape(n, K, G, K, H)
    return m, jnp.sum(p, axis=1), jnp.einsum("nkgjh,kj->nkgh", out, jnp.eye(K, dtype=out.dtype))


@jax.named_scope("attention")
def _attend_cached(q, k_new, v_new, cache: KVCache, layer, windows: tuple[int, ...], window_index, dtype):
    """The new token's attention over its cached prefix (the first windows[window_index] positions) plus
    itself -> [B, 1, N, H]. window_index: a scalar with a single window (every row reads it), or [B], one
    per row (a loop over the rows, each reading its own window)."""
    B, _, N, H = q.shape
    K = k_new.shape[2]
    qf = q.reshape(B, K, N // K, H).astype(jnp.float32) * (H**-0.5)

    def prefix(q_blocks, index, row=0):
        lengths = jax.lax.dynamic_slice_in_dim(cache.lengths, row, q_blocks.shape[0])
        if len(windows) == 1:  # no switch: the whole batch reads the one window
            return _prefix_attention(q_blocks, cache.keys, cache.values, layer, lengths, windows[0], row)
        branches = [
            lambda qb, w=w: _prefix_attention(qb, cache.keys, cache.values, layer, lengths, w, row) for w in windows
        ]
        return jax.lax.switch(index, branches, q_blocks)

    q_blocks = _query_blocks(qf)
    if jnp.ndim(window_index) == 0:
        m, l, acc = prefix(q_blocks, window_index)
    else:  # one row at a time: [1, ...] in, the row's pieces out
        m, l, acc = jax.lax.map(
            lambda xs: jax.tree.map(lambda a: a[0], prefix(xs[0][None], xs[1], xs[2])),
            (q_blocks, window_index, jnp.arange(B)),
        )
    s_self = jnp.sum(qf * k_new[:, 0, :, None, :].astype(jnp.float32), axis=-1)  # [B, K, G]
    m_all = jnp.maximum(m, s_self)
    prefix_scale, self_p = jnp.exp(m - m_all), jnp.exp(s_self - m_all)
    out = acc * prefix_scale[..., None] + self_p[..., None] * v_new[:, 0, :, None, :].astype(jnp.float32)
    out = out / (l * prefix_scale + self_p)[..., None]
    return out.reshape(B, 1, N, H).astype(dtype)


def fine_attention_windows(cache_len: int, block: int | None) -> tuple[int, ...]:
    """The prefix lengths a row may read with per-row windows: multiples of `block`, growing by one block
    or, once an eighth of the window is more than a block, by an eighth (rounded down to blocks), then the
    whole cache. A row reads at most one block or 12.5% beyond its prefix; a 9,216-position cache has
    30 windows, so the step's `lax.switch` stays small."""
    if block is None or block >= cache_len:
        return (cache_len,)
    windows, w = [], block
    while w < cache_len:
        windows.append(w)
        w = max(w + block, (w + w // 8) // block * block)
    return (*windows, cache_len)


def row_window_indices(lengths, active, windows: tuple[int, ...]):
    """[B] int32: for each row the index into `windows` of the smallest window that holds its own cached
    prefix (an inactive row: 0, the smallest window)."""
    return _smallest_window_index(jnp.where(active, lengths, 0), windows)


def _smallest_window_index(n, windows: tuple[int, ...]):
    return sum((n > w).astype(jnp.int32) for w in windows[:-1]) if len(windows) > 1 else jnp.zeros_like(n)


@jax.named_scope("mlp")
def _mlp_block(c: Qwen2Config, p, x):
    dt = x.dtype
    h = rms_norm(x, p["mlp_norm"], c.rms_norm_eps)
    gate = jnp.einsum("btd,df->btf", h, p["gate_proj"].astype(dt))
    up = jnp.einsum("btd,df->btf", h, p["up_proj"].astype(dt))
    return x + jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, p["down_proj"].astype(dt))


@jax.named_scope("attn_out")
def _attn_out(p, x, attn):
    return x + jnp.einsum("btnh,nhd->btd", attn, p["o_proj"].astype(x.dtype))


@jax.named_scope("embed")
def _embed(c: Qwen2Config, params, tokens):
    return params["embed"][tokens].astype(jnp.dtype(c.dtype))


@jax.named_scope("logits")
def logits_from_hidden(c: Qwen2Config, params, x):
    """Final norm and lm_head: hidden [B, T, D] -> float32 logits [B, T, V]."""
    x = rms_norm(x, params["final_norm"], c.rms_norm_eps)
    if c.tie_word_embeddings:
        return jnp.einsum("btd,vd->btv", x, params["embed"].astype(x.dtype), preferred_element_type=jnp.float32)
    return jnp.einsum("btd,dv->btv", x, params["lm_head"].astype(x.dtype), preferred_element_type=jnp.float32)


def _self_attention_layer(c: Qwen2Config, p, x, positions, mask):
    """One decoder layer over a whole sequence, mask [B, T(query), S(key)] -> (x, its keys, its values)."""
    h = rms_norm(x, p["attn_norm"], c.rms_norm_eps)
    q, k, v = _qkv(c, p, h, positions)
    with jax.named_scope("attention"):
        attn = _causal_attention(q, k, v, mask, x.dtype)
    x = _attn_out(p, x, attn)
    return _mlp_block(c, p, x), k, v


def causal_query_blocks(T: int) -> list[tuple[int, int]]:
    """The query blocks a causal pass over T positions is cut into: at most 8, of a multiple of 64 and at
    least 128. Each block is a few more fusions to compile (0.1-0.2 s each on this CPU); blocks of 64 at a
    row of 512 saved at most 5% of a pack's time for 0.3-0.7 s more compiling a program (BENCHMARKS.md)."""
    size = max(128, -(-T // (8 * 64)) * 64)
    return [(start, min(start + size, T)) for start in range(0, T, size)]


def _causal_attention(q, k, v, mask, dtype):
    """Attention under a causal mask [B, T(query), S(key)]: each block of queries reads only the keys up to
    its last query, since the mask hides every later one. That skips about 45% of the score work and keeps
    each block's scores small. Queries, keys and values are put head-major ([B, K, G, T, H], [B, K, S, H])
    once, so every block's two products are plain batched matmuls: with the token-major layout XLA's CPU
    backend transposed each block's operands again. The same arithmetic as `_scores` and
    `_weighted_values`; a CPU prefill pack takes 0.9x the time of the token-major layout
    (benchmarks/attention_layout.py)."""
    B, T, N, H = q.shape
    K = k.shape[2]
    q = q.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    parts = []
    for start, end in causal_query_blocks(T):
        scores = jnp.einsum(
            "bkgth,bksh->bkgts", q[:, :, :, start:end], k[:, :, :end], preferred_element_type=jnp.float32
        ) * (H**-0.5)
        probs = jax.nn.softmax(jnp.where(mask[:, None, None, start:end, :end], scores, _MASKED), axis=-1)
        parts.append(jnp.einsum("bkgts,bksh->bkgth", probs.astype(dtype), v[:, :, :end]))
    out = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=3)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def hidden_states(
    c: Qwen2Config, params, tokens, *, attention_mask=None, positions=None, segment_ids=None, remat=False
):
    """Full-sequence pass (training, scoring, prefill). Returns (final hidden [B,T,D], keys, values),
    where keys / values [L, B, T, K, H] are what a KV cache stores for these tokens. segment_ids [B, T]:
    several sequences packed in a row, a token attending only to earlier tokens of its own segment."""
    B, T = tokens.shape
    if attention_mask is None:
        attention_mask = jnp.ones((B, T), jnp.int32)
    if positions is None:
        positions = default_positions(attention_mask)
    valid = attention_mask.astype(bool)
    causal = jnp.tril(jnp.ones((T, T), bool))
    mask = causal[None, :, :] & valid[:, None, :]  # [B, T(query), S(key)]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])

    def layer(x, p):
        x, k, v = _self_attention_layer(c, p, x, positions, mask)
        return x, (k, v)

    if remat:
        layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.nothing_saveable)
    x, (keys, values) = jax.lax.scan(layer, _embed(c, params, tokens), params["layers"])
    return x, keys, values


def grouped_hidden_states(c: Qwen2Config, params, prompt_tokens, prompt_lengths, tokens, *, remat=False):
    """Training pass over GRPO groups without repeating the prompt: right-padded prompts [P, Tp] with
    lengths [P] are encoded once, and each prompt's G = R // P continuations tokens [R, Tc] (prompt-major)
    attend to their prompt's keys / values plus their own causal prefix. Gradients reach the prompt
    through every continuation that reads it. Returns the hidden state that predicts each continuation
    token, [R, Tc, D]: the prompt's last real position for token 0, the continuation's own before it."""
    P, Tp = prompt_tokens.shape
    R, Tc = tokens.shape
    G = R // P
    prompt_valid = jnp.arange(Tp)[None, :] < prompt_lengths[:, None]  # [P, Tp]
    prompt_positions = jnp.broadcast_to(jnp.arange(Tp)[None, :], (P, Tp))
    positions = jnp.repeat(prompt_lengths, G)[:, None] + jnp.arange(Tc)[None, :]  # [R, Tc]
    prompt_mask = jnp.tril(jnp.ones((Tp, Tp), bool))[None] & prompt_valid[:, None, :]  # [P, Tp, Tp]
    prefix_mask = jnp.repeat(prompt_valid, G, axis=0)[:, None, None, None, :]  # [R, 1, 1, 1, Tp]
    causal = jnp.tril(jnp.ones((Tc, Tc), bool))[None, None, None]

    def layer(carry, p):
        xp, xc = carry
        xp, kp, vp = _self_attention_layer(c, p, xp, prompt_positions, prompt_mask)

        hc = rms_norm(xc, p["attn_norm"], c.rms_norm_eps)
        qc, kc, vc = _qkv(c, p, hc, positions)
        with jax.named_scope("attention"):
            kp, vp = jnp.repeat(kp, G, axis=0), jnp.repeat(vp, G, axis=0)
            s_prefix = jnp.where(prefix_mask, _scores(qc, kp), _MASKED)
            s_own = jnp.where(causal, _scores(qc, kc), _MASKED)
            probs = jax.nn.softmax(jnp.concatenate([s_prefix, s_own], axis=-1), axis=-1)
            attn = _weighted_values(probs[..., :Tp], vp, xc.dtype) + _weighted_values(probs[..., Tp:], vc, xc.dtype)
        xc = _mlp_block(c, p, _attn_out(p, xc, attn))
        return (xp, xc), None

    if remat:
        layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.nothing_saveable)
    carry = (_embed(c, params, prompt_tokens), _embed(c, params, tokens))
    (xp, xc), _ = jax.lax.scan(layer, carry, params["layers"])
    last = jnp.take_along_axis(xp, (prompt_lengths - 1)[:, None, None], axis=1)  # [P, 1, D]
    return jnp.concatenate([jnp.repeat(last, G, axis=0), xc[:, :-1]], axis=1)


def forward(c: Qwen2Config, params, tokens, *, attention_mask=None, positions=None, remat=False):
    """tokens [B, T] int32, attention_mask [B, T] (1 = real) -> float32 logits [B, T, V]."""
    x, _, _ = hidden_states(c, params, tokens, attention_mask=attention_mask, positions=positions, remat=remat)
    return logits_from_hidden(c, params, x)


class KVCache(NamedTuple):
    """keys / values [L, B, S, K, H] in the compute dtype; lengths [B]: filled positions per row,
    which is also where each row writes next (rows of different prompt lengths decode together)."""

    keys: jax.Array
    values: jax.Array
    lengths: jax.Array


def prefill(c: Qwen2Config, params, tokens, lengths, cache_len: int):
    """Right-padded prompts tokens [B, P] with lengths [B] -> (logits at each row's last token [B, V],
    a KVCache of length cache_len holding the prompts)."""
    B, P = tokens.shape
    mask = (jnp.arange(P)[None, :] < lengths[:, None]).astype(jnp.int32)
    x, keys, values = hidden_states(c, params, tokens, attention_mask=mask)
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)  # [B, 1, D]
    with jax.named_scope("cache_write"):
        pad = [(0, 0), (0, 0), (0, cache_len - P), (0, 0), (0, 0)]
        cache = KVCache(jnp.pad(keys, pad), jnp.pad(values, pad), lengths.astype(jnp.int32))
    return logits_from_hidden(c, params, last)[:, 0], cache


def prefill_packed(c: Qwen2Config, params, tokens, segment_ids, positions, last):
    """Prompts packed into rows, tokens [R, T] (segment_ids [R, T]: which prompt of its row a token
    belongs to; positions [R, T]: its position in that prompt) -> (logits [M, V] at the flat token
    indices last [M] (each prompt's last token), keys, values [L, R * T, K, H], one entry per token).
    Padding tokens form segments of their own and are never read."""
    R, T = tokens.shape
    x, keys, values = hidden_states(c, params, tokens, positions=positions, segment_ids=segment_ids)
    flat = lambda a: a.reshape(a.shape[0], R * T, *a.shape[3:])
    logits = logits_from_hidden(c, params, x.reshape(1, R * T, -1)[:, last])[0]
    return logits, flat(keys), flat(values)


def decode_step(
    c: Qwen2Config,
    params,
    tokens,
    cache: KVCache,
    *,
    active=None,
    block_size: int | None = None,
    row_windows: bool = False,
):
    """One new token per row, tokens [B], written at cache.lengths -> (logits [B, V], updated cache).

    Each layer attends over the cached prefix (read-only inside the scan, sliced out of the stacked
    cache) plus the new token itself; the new keys / values are written into the cache once, after the
    scan, with a per-row scatter, so the cache is never copied per layer. active [B] (default all): rows
    that take the token; inactive rows neither write nor advance. row_windows: each row reads only the
    smallest window of `fine_attention_windows(S, block_size)` that holds its own prefix (a `lax.map`
    over the rows with a `lax.switch` per row), so a batch of ragged rows reads about the sum of their
    lengths, not B x the longest: the choice for one CPU device, where the loop costs little and the
    reads are most of the step. Otherwise every row reads the whole cache (the reference; accelerators
    use `decode_step_layers`)."""
    B = tokens.shape[0]
    S = cache.keys.shape[2]
    if active is None:
        active = jnp.ones(B, bool)
    windows = fine_attention_windows(S, block_size) if row_windows else (S,)
    window_index = row_window_indices(cache.lengths, active, windows) if row_windows else jnp.zeros((), jnp.int32)
    positions = cache.lengths[:, None]  # [B, 1]

    def layer(x, xs):
        p, index = xs
        h = rms_norm(x, p["attn_norm"], c.rms_norm_eps)
        q, k, v = _qkv(c, p, h, positions)
        attn = _attend_cached(q, k, v, cache, index, windows, window_index, x.dtype)
        x = _attn_out(p, x, attn)
        return _mlp_block(c, p, x), (k[:, 0], v[:, 0])

    x, (new_k, new_v) = jax.lax.scan(
        layer, _embed(c, params, tokens[:, None]), (params["layers"], jnp.arange(c.num_layers))
    )
    with jax.named_scope("cache_write"):
        rows = jnp.arange(B)
        write_at = jnp.where(active, cache.lengths, S)  # out of range -> dropped
        keys = cache.keys.at[:, rows, write_at].set(new_k, mode="drop")
        values = cache.values.at[:, rows, write_at].set(new_v, mode="drop")
        lengths = cache.lengths + active.astype(jnp.int32)
    return logits_from_hidden(c, params, x)[:, 0], KVCache(keys, values, lengths)


# ----------------------------------------------------------------------------------------------
# Decoding on accelerators: one cache array per layer and the layers unrolled, so that a step has no
# loop and no conditional inside it (on XLA:GPU each `cond` and each loop of unknown trip count blocks
# the host) and the attention kernel reads each layer's cache in place (a layer sliced out of a stacked
# cache would be copied before a kernel could read it).


class LayerCache(NamedTuple):
    """keys / values: one [K, B, S, H] array per layer (kv-head-major, the layout the decode kernels of
    `decode_attention` read); lengths [B]: filled positions per row, where each row writes next."""

    keys: tuple
    values: tuple
    lengths: jax.Array


def empty_layer_cache(c: Qwen2Config, batch: int, capacity: int) -> LayerCache:
    shape = (c.num_kv_heads, batch, capacity, c.head_dim)
    dt = jnp.dtype(c.dtype)
    return LayerCache(
        tuple(jnp.zeros(shape, dt) for _ in range(c.num_layers)),
        tuple(jnp.zeros(shape, dt) for _ in range(c.num_layers)),
        jnp.zeros(batch, jnp.int32),
    )


class PagedCache(NamedTuple):
    """The paged KV cache: keys / values one page pool per layer [K, num_pages, P, H] (the layout of
    `rrm_jax.model.paged_attention`), whose pages the rows hold through a page table the caller passes
    with each call; lengths [B]: filled positions per row, where each row writes next."""

    keys: tuple
    values: tuple
    lengths: jax.Array


def empty_paged_cache(c: Qwen2Config, batch: int, num_pages: int, page_size: int) -> PagedCache:
    shape = (c.num_kv_heads, num_pages, page_size, c.head_dim)
    dt = jnp.dtype(c.dtype)
    return PagedCache(
        tuple(jnp.zeros(shape, dt) for _ in range(c.num_layers)),
        tuple(jnp.zeros(shape, dt) for _ in range(c.num_layers)),
        jnp.zeros(batch, jnp.int32),
    )


def unstack_layers(params) -> dict:
    """params with params["layers"] as a tuple of one dict per layer (separate arrays), the form
    `decode_step_layers` takes: each layer's weights then feed its matmuls without a slice copy."""
    layers = params["layers"]
    L = next(iter(jax.tree.leaves(layers))).shape[0]
    return {**params, "layers": tuple(jax.tree.map(lambda a, l=l: a[l], layers) for l in range(L))}


def write_rows(layer_k, layer_v, positions, k_new, v_new, active):
    """A LayerCache layer's write: each active row's key / value [B, K, H] at its position."""
    at = jnp.where(active, positions, layer_k.shape[2])  # out of range -> dropped
    rows = jnp.arange(positions.shape[0])
    put = lambda dst, new: dst.at[:, rows, at].set(new.swapaxes(0, 1).astype(dst.dtype), mode="drop")
    return put(layer_k, k_new), put(layer_v, v_new)


def decode_step_layers(c: Qwen2Config, params, tokens, cache, *, active, attend, write=write_rows):
    """decode_step for a LayerCache (or a PagedCache, with its `write` and `attend`) and unstacked params
    (`unstack_layers`): tokens [B] -> (logits [B, V], updated cache). Each layer writes the new token's
    key / value at its row's length first, with write(keys, values, positions [B], k [B, K, H], v,
    active) -> (keys, values), then attends over length + 1 positions with attend(q [B, N, H], keys,
    values, lengths) -> [B, N, H] (one of `decode_attention`'s or `paged_attention`'s implementations).
    Inactive rows neither write nor advance (their output is computed over one position and ignored, so
    a finished row's stale length costs a kernel nothing)."""
    positions = cache.lengths[:, None]
    lengths = cache.lengths + active.astype(jnp.int32)
    read = jnp.where(active, lengths, 1)
    x = _embed(c, params, tokens[:, None])
    keys, values = [], []
    for layer, (p, layer_k, layer_v) in enumerate(zip(params["layers"], cache.keys, cache.values)):
        with jax.named_scope(f"layer{layer}"):  # unrolled: a profile tells the layers apart
            h = rms_norm(x, p["attn_norm"], c.rms_norm_eps)
            q, k, v = _qkv(c, p, h, positions)
            with jax.named_scope("cache_write"):
                layer_k, layer_v = write(layer_k, layer_v, cache.lengths, k[:, 0], v[:, 0], active)
            attn = attend(q[:, 0], layer_k, layer_v, read)
            x = _mlp_block(c, p, _attn_out(p, x, attn[:, None].astype(x.dtype)))
        keys.append(layer_k)
        values.append(layer_v)
    return logits_from_hidden(c, params, x)[:, 0], cache._replace(
        keys=tuple(keys), values=tuple(values), lengths=lengths
    )


@jax.named_scope("cache_write")
def insert_tokens(cache, slots, positions, keys, values):
    """Write prefilled keys / values [L, M, K, H] (one entry per token) at (slots [M], positions [M]) of a
    KVCache or a LayerCache; an entry whose slot is out of range (padding) is dropped. Lengths are
    the caller's to set."""
    if isinstance(cache, LayerCache):
        put = lambda dst, src: dst.at[:, slots, positions].set(src.swapaxes(0, 1).astype(dst.dtype), mode="drop")
        return cache._replace(
            keys=tuple(put(d, keys[l]) for l, d in enumerate(cache.keys)),
            values=tuple(put(d, values[l]) for l, d in enumerate(cache.values)),
        )
    put = lambda dst, src: dst.at[:, slots, positions].set(src.astype(dst.dtype), mode="drop")
    return cache._replace(keys=put(cache.keys, keys), values=put(cache.values, values))


def take_rows(cache, rows):
    """The cache of the rows `rows` [n] only (their batch entries gathered)."""
    if isinstance(cache, PagedCache):  # the pages stay where they are: only the page table's rows move (the caller's)
        return cache._replace(lengths=cache.lengths[rows])
    if isinstance(cache, LayerCache):
        return LayerCache(
            tuple(k[:, rows] for k in cache.keys), tuple(v[:, rows] for v in cache.values), cache.lengths[rows]
        )
    return KVCache(cache.keys[:, rows], cache.values[:, rows], cache.lengths[rows])
