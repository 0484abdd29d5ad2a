"""Ragged decode attention (rrm_jax.model.decode_attention) and the accelerator decode path built on it:
the Pallas kernels in interpret mode against the XLA reference and a NumPy softmax, each row reading
only its own length, and the structure of the accelerator decode program (no conditional, no loop of
unknown trip count)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rrm_jax import engine, parallel
from rrm_jax.model import decode_attention, qwen2
from rrm_jax.model.config import preset
from rrm_jax.sampling import make_settings

B, K, G, H, S = 6, 2, 3, 32, 512
LENGTHS = [1, 5, 128, 129, 300, 512]  # one position, inside a block, on and across block edges, full


def _inputs(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(B, K * G, H))
    k, v = rng.normal(size=(K, B, S, H)), rng.normal(size=(K, B, S, H))
    return tuple(jnp.asarray(a, dtype) for a in (q, k, v)) + (jnp.asarray(LENGTHS, jnp.int32),)


def _numpy_attention(q, k, v, lengths):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    out = np.zeros(q.shape)
    for b, n in enumerate(np.asarray(lengths)):
        for h in range(K * G):
            s = k[h // G, b, :n] @ q[b, h] / np.sqrt(H)
            p = np.exp(s - s.max())
            out[b, h] = p @ v[h // G, b, :n] / p.sum()
    return out


def test_xla_attention_equals_a_numpy_softmax_over_each_rows_length():
    q, k, v, lengths = _inputs()
    want = _numpy_attention(q, k, v, lengths)
    np.testing.assert_allclose(decode_attention.attend(q, k, v, lengths, impl="xla"), want, atol=1e-5)
    # a window that holds every row reads the same
    np.testing.assert_allclose(decode_attention.attend(q, k, v, lengths, impl="xla", window=S), want, atol=1e-5)


@pytest.mark.parametrize(
    "impl,dtype,atol",
    [("pallas-gpu", jnp.float32, 1e-5), ("pallas-gpu", jnp.bfloat16, 2e-2), ("pallas-tpu", jnp.bfloat16, 2e-2)],
)
def test_kernels_in_interpret_mode_equal_the_reference(impl, dtype, atol):
    """The TPU kernel computes in bfloat16, so it is compared on bfloat16 inputs."""
    q, k, v, lengths = _inputs(dtype)
    want = _numpy_attention(q, k, v, lengths)
    got = decode_attention.attend(q, k, v, lengths, impl=impl, interpret=True)
    assert got.shape == q.shape and got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=atol)


def test_gpu_kernel_splits_fit_every_capacity_the_engine_allocates():
    assert decode_attention.gpu_splits(512) == (4, 128)
    assert decode_attention.read_granularity("pallas-gpu", 512) == 128
    assert decode_attention.gpu_splits(9216) == (8, 128)  # 1,024 + 8,192 positions
    for capacity in range(128, 20000, 128):
        k_splits, block_k = decode_attention.gpu_splits(capacity)
        assert capacity % (k_splits * block_k) == 0 and block_k >= 16
    with pytest.raises(ValueError, match="multiple of 16"):
        decode_attention.gpu_splits(100)


def test_kernel_over_a_mesh_equals_one_device():
    """shard_map: batch over (data, fsdp), kv heads over tp."""
    q, k, v, lengths = _inputs()
    one = decode_attention.attend(q, k, v, lengths, impl="pallas-gpu", interpret=True)
    for mesh in (parallel.make_mesh(2, 1, 2, devices=jax.devices()[:4]), parallel.make_mesh(1, 2, 4)):
        got = decode_attention.attend(q, k, v, lengths, impl="pallas-gpu", mesh=mesh, interpret=True)
        np.testing.assert_allclose(got, one, atol=1e-6)


@pytest.mark.parametrize("impl", ["xla", "pallas-gpu", "pallas-tpu"])
def test_layers_step_reads_each_rows_own_length(impl):
    """The accelerator step (one cache array per layer, layers unrolled): positions a row must not read
    hold NaN, and its logits equal the stacked-cache step over a clean cache. The kernels read whole
    blocks of 128 positions up to a row's length; the XLA path reads the host's window for every row."""
    config = preset("tiny")
    params = qwen2.Qwen2(config, rngs=nnx.Rngs(1)).params()
    L, Kc, Hc = config.num_layers, config.num_kv_heads, config.head_dim
    S_, block = 512, 128
    lengths = jnp.asarray([5, 70, 300], jnp.int32)
    active = jnp.asarray([True, True, True])
    window = engine.host_window(300, 1, block, S_)  # the smallest doubling of 128 holding 300 + 1
    assert window == 512
    if impl == "xla":
        reads = np.full(3, window)
    else:  # whole blocks up to the one holding each row's length + 1
        g = decode_attention.read_granularity(impl, S_)
        reads = -(-(np.asarray(lengths) + 1) // g) * g
    if impl == "pallas-gpu":
        assert reads.tolist() == [128, 128, 384]
    rng = jax.random.key(0)
    keys = jax.random.normal(rng, (L, 3, S_, Kc, Hc))
    values = jax.random.normal(jax.random.fold_in(rng, 1), (L, 3, S_, Kc, Hc))
    unread = jnp.arange(S_)[None, None, :, None, None] >= jnp.asarray(reads)[None, :, None, None, None]
    tokens = jnp.asarray([3, 4, 5], jnp.int32)

    def layer_cache(k, v, n):
        return qwen2.LayerCache(
            tuple(k[l].transpose(2, 0, 1, 3) for l in range(L)), tuple(v[l].transpose(2, 0, 1, 3) for l in range(L)), n
        )

    attend = lambda q, k, v, n: decode_attention.attend(q, k, v, n, impl=impl, window=window, interpret=True)
    step = jax.jit(
        lambda c, a: qwen2.decode_step_layers(config, qwen2.unstack_layers(params), tokens, c, active=a, attend=attend)
    )
    logits, new = step(
        layer_cache(jnp.where(unread, jnp.nan, keys), jnp.where(unread, jnp.nan, values), lengths), active
    )
    reference, ref_cache = qwen2.decode_step(config, params, tokens, qwen2.KVCache(keys, values, lengths))
    assert np.isfinite(np.asarray(logits)).all()
    tol = 2e-2 if impl == "pallas-tpu" else 1e-5  # the TPU kernel computes in bfloat16
    np.testing.assert_allclose(logits, reference, atol=tol)
    assert np.asarray(new.lengths).tolist() == [6, 71, 301]
    for l in range(L):  # the new token's key went where the stacked step put it
        np.testing.assert_allclose(new.keys[l][:, 1, 70], ref_cache.keys[l, 1, 70], atol=tol)

    # an inactive row neither writes nor advances
    logits, new = step(layer_cache(keys, values, lengths), jnp.asarray([True, False, True]))
    assert np.asarray(new.lengths).tolist() == [6, 70, 301]
    np.testing.assert_array_equal(new.keys[0][:, 1, 70], keys[0, 1, 70])


def _whiles_and_conditionals(compiled_text: str):
    whiles = [line for line in compiled_text.splitlines() if re.search(r"\swhile\(", line)]
    return whiles, "conditional(" in compiled_text


def test_accelerator_decode_program_has_no_conditional_and_only_known_trip_counts():
    """On XLA:GPU every conditional and every loop whose trip count XLA cannot prove copies a value to
    the host and waits. The "layers" program (lowered here with the XLA attention in the kernel's place)
    has neither: the chunk is a scan, the layers are unrolled, the window was chosen on the host. The
    CPU "rows" program, for contrast, has both (its early-exit chunk loop and its per-row windows)."""
    config = preset("tiny")
    params = qwen2.Qwen2(config, rngs=nnx.Rngs(0)).params()
    settings = make_settings(
        config,
        temperature=1.0,
        top_p=0.9,
        top_k=5,
        eos_ids=[3],
        max_think_tokens=4,
        tokenizer=None,
        think_end_ids_override=(5, 6),
    )
    state = engine.empty_state_fn(config, 4, 256, None, "layers")
    text = (
        engine.decode_fn.lower(config, settings, 8, 128, "xla", None, qwen2.unstack_layers(params), state, np.int32(4))
        .compile()
        .as_text()
    )
    whiles, conditional = _whiles_and_conditionals(text)
    assert not conditional
    assert whiles and all("known_trip_count" in w for w in whiles)
    assert any('"known_trip_count":{"n":"8"}' in w for w in whiles)  # the chunk of 8 steps

    state = engine.empty_state_fn(config, 4, 256, None, "rows")
    text = engine.decode_fn.lower(config, settings, 8, 128, None, None, params, state, np.int32(4)).compile().as_text()
    whiles, conditional = _whiles_and_conditionals(text)
    assert conditional and not all("known_trip_count" in w for w in whiles)


def test_decode_path_and_attention_by_backend(monkeypatch):
    assert engine.decode_path(None) == "rows"  # one CPU device
    assert engine.decode_path(parallel.make_mesh(2, 2, 2)) == "layers"
    assert decode_attention.default_impl("gpu") == "pallas-gpu"
    assert decode_attention.default_impl("tpu") == "pallas-tpu"
    assert decode_attention.default_impl("cpu") == "xla"
    monkeypatch.setenv(engine.ATTENTION_ENV, "pallas-gpu")
    assert engine.attention_impl() == "pallas-gpu"
    monkeypatch.setenv(engine.ATTENTION_ENV, "triton")
    with pytest.raises(Exception, match="RRM_JAX_DECODE_ATTENTION='triton': use one of xla, pallas-gpu, pallas-tpu"):
        engine.attention_impl()
