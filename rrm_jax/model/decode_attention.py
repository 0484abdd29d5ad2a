"""Ragged decode attention: one new query per row over that row's own cached length, behind one small
interface so the kernel under it can change with the JAX release.

The cache this reads is one pair of arrays per layer, kv-head-major: keys / values [K, B, S, H]. That is
the layout both maintained kernels take without a transposed copy per call: the GPU split-K kernel reads
the [K * B, S, H] view (a free reshape) and the TPU paged kernel reads [K, B * S / page, page, H] pages
of it (also a free reshape) through a trivial page table.

    attend(q, keys, values, lengths, impl=..., window=...) -> [B, N, H]

q [B, N, H] (N = K * G query heads), lengths [B] (positions < lengths are attended; each >= 1, since the
new token is written before it attends). Implementations:

    "xla"         pure XLA: every row reads the first `window` positions (chosen on the host, so no
                  `cond` runs on the device), masked past its length. Runs anywhere; the reference.
    "pallas-gpu"  jax.experimental.pallas.ops.gpu.decode_attention.mqa (Pallas-Triton, split-K flash
                  decoding with per-row kv_seq_len: each row's splits stop at its own length).
    "pallas-tpu"  jax.experimental.pallas.ops.tpu.paged_attention over pages of the contiguous cache.

The Pallas-Triton backend is deprecated from JAX 0.11 (openxla/tokamax is its successor, which has no
split-K decode kernel yet); its import is confined to `_gpu_mqa` so a replacement is one function.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from rrm_jax import parallel
from rrm_jax.sizes import next_power_of_two

IMPLS = ("xla", "pallas-gpu", "pallas-tpu")
TPU_PAGE = 128  # positions per page of the TPU kernel's view; the engine's capacities are multiples of it
_MASKED = -1e30


def default_impl(backend: str | None = None) -> str:
    """The kernel for a backend: Pallas on GPU and TPU, XLA elsewhere."""
    backend = backend or jax.default_backend()
    return {"gpu": "pallas-gpu", "cuda": "pallas-gpu", "rocm": "pallas-gpu", "tpu": "pallas-tpu"}.get(backend, "xla")


@jax.named_scope("attention")
def attend(
    q, keys, values, lengths, *, impl: str = "xla", window: int | None = None, mesh=None, interpret: bool = False
):
    """q [B, N, H], keys / values [K, B, S, H], lengths [B] int32 -> [B, N, H] in q's dtype.

    window: the positions the "xla" path reads (>= every length; default all S); the kernels read each
    row's own length and ignore it. mesh: run the kernel on each device's shard (batch over data x fsdp,
    kv heads over tp). interpret: run a Pallas kernel in interpret mode (CPU tests)."""
    if impl == "xla":
        return _xla(q, keys, values, lengths, window or keys.shape[2])
    kernel = {"pallas-gpu": _gpu, "pallas-tpu": _tpu}[impl]
    kernel = functools.partial(kernel, interpret=interpret)
    if mesh is None or mesh.size == 1:
        return kernel(q, keys, values, lengths)
    # batch over (data, fsdp) and kv heads over tp, as the cache is laid out; the query heads follow
    # their kv head (head n = k * G + g, so contiguous blocks of N go with blocks of K)
    kv_spec = parallel.logical_to_spec(("kv_heads", "batch", "length", "head_dim"), mesh, keys.shape)
    q_spec, len_spec = PartitionSpec(kv_spec[1], kv_spec[0], None), PartitionSpec(kv_spec[1])
    return jax.shard_map(
        kernel, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, len_spec), out_specs=q_spec, check_vma=False
    )(q, keys, values, lengths)


def _xla(q, keys, values, lengths, window: int):
    B, N, H = q.shape
    K = keys.shape[0]
    qf = q.reshape(B, K, N // K, H).astype(jnp.float32) * (H**-0.5)
    k = keys[:, :, :window].astype(jnp.float32)  # [K, B, W, H]
    v = values[:, :, :window].astype(jnp.float32)
    s = jnp.einsum("bkgh,kbsh->bkgs", qf, k)
    valid = (jnp.arange(window)[None, :] < lengths[:, None])[:, None, None, :]
    p = jax.nn.softmax(jnp.where(valid, s, _MASKED), axis=-1)
    return jnp.einsum("bkgs,kbsh->bkgh", p, v).reshape(B, N, H).astype(q.dtype)


def gpu_splits(S: int) -> tuple[int, int]:
    """(k_splits, block_k) for the GPU kernel: S must split into k_splits equal parts, each a whole
    number of block_k positions (>= 16). Prefers the widest block, then the most splits."""
    for block_k in (128, 64, 32, 16):
        for k_splits in (16, 8, 4, 2, 1):
            if S % (k_splits * block_k) == 0:
                return k_splits, block_k
    raise ValueError(f"cache length {S} is not a multiple of 16")


def tpu_blocks(S: int) -> tuple[int, int]:
    """(page, pages_per_compute_block) of the TPU kernel's view of an S-position cache."""
    page = math.gcd(S, TPU_PAGE)
    return page, next(n for n in (8, 4, 2, 1) if (S // page) % n == 0)


def read_granularity(impl: str, S: int) -> int:
    """A kernel reads a row's positions in whole blocks of this many, up to the block holding its
    length (positions past that are never read)."""
    if impl == "pallas-gpu":
        return gpu_splits(S)[1]
    if impl == "pallas-tpu":
        page, per_block = tpu_blocks(S)
        return page * per_block
    raise ValueError(f"{impl!r} reads the window it is given, not each row's length")


def _gpu_mqa():
    with warnings.catch_warnings():  # deprecated from JAX 0.11 in favour of tokamax (module docstring)
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import decode_attention
    return decode_attention.mqa


def _gpu(q, keys, values, lengths, *, interpret: bool):
    B, N, H = q.shape
    K, _, S, _ = keys.shape
    G = N // K
    k_splits, block_k = gpu_splits(S)
    qk = q.reshape(B, K, G, H).transpose(1, 0, 2, 3).reshape(K * B, G, H)  # row (k, b): kv head k of row b
    out = _gpu_mqa()(
        qk,
        keys.reshape(K * B, S, H),
        values.reshape(K * B, S, H),
        kv_seq_len=jnp.tile(lengths, K),
        sm_scale=H**-0.5,
        k_splits=k_splits,
        block_k=block_k,
        block_h=max(16, next_power_of_two(G)),
        interpret=interpret,
    )
    return out.reshape(K, B, G, H).transpose(1, 0, 2, 3).reshape(B, N, H).astype(q.dtype)


def _tpu(q, keys, values, lengths, *, interpret: bool):
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

    B, N, H = q.shape
    K, _, S, _ = keys.shape
    page, per_block = tpu_blocks(S)
    per_row = S // page
    pages = [K, B * per_row, page, H]
    table = jnp.arange(B * per_row, dtype=jnp.int32).reshape(B, per_row)  # row b owns its own contiguous pages
    run = functools.partial(paged_attention, pages_per_compute_block=per_block)
    qs = (q.astype(jnp.float32) * H**-0.5).astype(q.dtype)  # the kernel does not scale its queries
    args = (qs, keys.reshape(pages), values.reshape(pages), lengths.astype(jnp.int32), table)
    if interpret:
        with pltpu.force_tpu_interpret_mode():
            return run(*args).astype(q.dtype)
    return run(*args).astype(q.dtype)
