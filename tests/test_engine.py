"""The continuous-batching engine against the static sampler (itself the pre-engine sampler) and against
its own invariants: refilled slots, per-request limits, seeded streams, thinking budget, compilations,
sharding and the attention's block reads."""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_utils import make_hf_model

from rrm_jax import engine, generate, load_model, parallel, static_sampler
from rrm_jax.model import qwen2
from rrm_jax.model.config import preset
from rrm_jax.sampling import make_settings

# Lengths over two buckets (16 and 64) and limits that differ per request.
PROMPTS = [[(7 * i + j) % 97 + 3 for j in range(n)] for i, n in enumerate([5, 23, 1, 40, 9, 16, 17, 3, 30, 12])]
LIMITS = [12, 3, 30, 7, 19, 1, 25, 9, 14, 21]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder, _ = make_hf_model(tmp_path_factory.mktemp("engine"))
    return load_model(folder)[0]


def settings_for(model, **kw):
    kw = {
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 0,
        "eos_ids": [],
        "max_think_tokens": None,
        "tokenizer": None,
        "think_end_ids_override": None,
        **kw,
    }
    return make_settings(model.config, **kw)


def requests_for(prompts=PROMPTS, limits=LIMITS):
    return [engine.Request(p, m, i) for i, (p, m) in enumerate(zip(prompts, limits))]


def static_reference(model, settings, prompts, limits, num_samples=1, seed=0):
    """All requests as one static batch (one compilation), each row stopping at its own limit."""
    return static_sampler.sample_batch(
        model.config,
        settings,
        model.params(),
        prompts,
        max(LIMITS + limits),
        limits=limits,
        num_samples=num_samples,
        seed=seed,
    )


@pytest.mark.parametrize("num_samples,max_rows", [(1, 4), (2, 4)])
def test_greedy_equals_static_sampler_with_refilled_slots(model, num_samples, max_rows):
    settings = settings_for(model)
    stats = engine.EngineStats()
    got = engine.generate(
        model.config,
        settings,
        model.params(),
        requests_for(),
        num_samples=num_samples,
        max_rows=max_rows,
        block_size=16,
        chunk=8,
        stats=stats,
    )
    want = static_reference(model, settings, PROMPTS, LIMITS, num_samples)
    assert stats.slots == max_rows < len(PROMPTS) * num_samples  # slots were refilled
    assert stats.prefills == len(PROMPTS)  # each prompt prefilled once, whatever num_samples
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.output_ids == w.output_ids, i
        assert len(g.output_ids) == LIMITS[i // num_samples] and g.finish_reason == "length"
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5)


def test_sampled_logprobs_equal_static_sampler(model):
    settings = settings_for(model, temperature=0.8, top_k=20, top_p=0.9)
    got = engine.generate(
        model.config,
        settings,
        model.params(),
        requests_for(),
        num_samples=2,
        seed=5,
        max_rows=4,
        block_size=16,
        chunk=8,
    )
    want = static_reference(model, settings, PROMPTS, LIMITS, num_samples=2, seed=5)
    for g, w in zip(got, want):
        assert g.output_ids == w.output_ids
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5)
        np.testing.assert_allclose(g.sampling_logprobs, w.sampling_logprobs, atol=1e-5)


def test_eos_frees_the_slot_and_the_row_ends_with_it(model):
    free = generate.sample(model, PROMPTS, max_new_tokens=LIMITS, eos_ids=[])
    eos = free[6].output_ids[4]  # a token request 6 produces early on
    settings = settings_for(model, eos_ids=[eos])
    got = engine.generate(model.config, settings, model.params(), requests_for(), max_rows=3, block_size=16, chunk=4)
    want = static_reference(model, settings, PROMPTS, LIMITS)
    assert [g.output_ids for g in got] == [w.output_ids for w in want]
    assert got[6].finish_reason == "eos" and got[6].output_ids[-1] == eos and len(got[6].output_ids) <= 5


def test_accelerator_path_equals_static_sampler_with_refills_eos_and_a_chunk_in_flight(model):
    """The "layers" path (what accelerators run) on this CPU: refilled slots, EOS, two samples a prompt,
    compaction and, in the tail, a chunk dispatched before the previous one is read."""
    free = generate.sample(model, PROMPTS, max_new_tokens=LIMITS, eos_ids=[])
    settings = settings_for(model, temperature=0.7, eos_ids=[free[6].output_ids[4]])
    stats = engine.EngineStats()
    got = engine.generate(
        model.config,
        settings,
        model.params(),
        requests_for(),
        num_samples=2,
        seed=4,
        max_rows=6,
        block_size=16,
        chunk=4,
        path="layers",
        stats=stats,
    )
    want = static_reference(model, settings, PROMPTS, LIMITS, num_samples=2, seed=4)
    assert stats.path == "layers" and stats.attention == "xla" and stats.compactions >= 1
    for g, w in zip(got, want):
        assert g.output_ids == w.output_ids
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5)
    assert stats.live_row_steps == sum(len(g.output_ids) for g in got)


def test_seeded_samples_do_not_depend_on_slots_or_arrival_order(model):
    settings = settings_for(model, temperature=1.0)
    runs = []
    for max_rows, order in [(2, 1), (3, 1), (8, 1), (3, -1)]:
        reqs = requests_for()[::order]
        out = engine.generate(
            model.config,
            settings,
            model.params(),
            reqs,
            num_samples=2,
            seed=11,
            max_rows=max_rows,
            block_size=16,
            chunk=5,
        )
        by_key = {(r.index, j): out[k * 2 + j].output_ids for k, r in enumerate(reqs) for j in range(2)}
        runs.append(by_key)
    assert all(r == runs[0] for r in runs[1:])
    other = engine.generate(
        model.config,
        settings,
        model.params(),
        requests_for(),
        num_samples=2,
        seed=12,
        max_rows=3,
        block_size=16,
        chunk=5,
    )
    assert [o.output_ids for o in other] != [runs[0][(i, j)] for i in range(len(PROMPTS)) for j in range(2)]


def test_thinking_budget_in_refilled_slots(model):
    forced = (50, 51, 52)  # stands for "\n</think>\n\n"; the last id closes thinking
    settings = settings_for(model, max_think_tokens=4, think_end_ids_override=forced)
    limits = [20] * len(PROMPTS)
    stats = engine.EngineStats()
    got = engine.generate(
        model.config,
        settings,
        model.params(),
        requests_for(limits=limits),
        max_rows=2,
        block_size=16,
        chunk=3,
        stats=stats,
    )
    want = static_reference(model, settings, PROMPTS, limits)
    free = static_reference(model, settings_for(model), PROMPTS, limits)
    assert stats.prefills > stats.slots  # most rows ran in refilled slots
    assert [g.output_ids for g in got] == [w.output_ids for w in want]
    budgeted = [g for g, f in zip(got, free) if 52 not in f.output_ids[:4]]
    assert len(budgeted) >= 5
    for g in budgeted:
        assert tuple(g.output_ids[4:7]) == forced and len(g.output_ids) == 20  # then on to its verdict


@pytest.mark.parametrize("rows", [1, 8])  # a CPU's prefill rows a call, and an accelerator's
def test_compilations_stay_flat_over_varied_lengths_and_counts(model, rows, monkeypatch):
    monkeypatch.setitem(engine.PREFILL_ROWS, jax.default_backend(), rows)
    settings = settings_for(model)
    prefill_before, decode_before = engine.prefill_fn._cache_size(), engine.decode_fn._cache_size()
    rng = np.random.default_rng(0)
    for count in (9, 5, 13, 7, 11):
        prompts = [list(rng.integers(3, 100, rng.integers(1, 60))) for _ in range(count)]  # 1-59 tokens
        reqs = [engine.Request(p, 6, i) for i, p in enumerate(prompts)]
        stats = engine.EngineStats()
        engine.generate(
            model.config, settings, model.params(), reqs, max_rows=4, block_size=16, stats=stats, prefill_tokens=64
        )
        assert stats.prefills == count and stats.prefill_calls < count  # packs of several prompts
    # one decode program for the whole stream, plus one per compacted batch size of the tail (2, 1 slots)
    assert engine.decode_fn._cache_size() - decode_before <= 1 + engine.MAX_COMPACTIONS
    # one token budget for every prompt length: a program per power of two of rows a call takes, and a
    # one-row call per quarter of the budget its prompts fill
    assert engine.prefill_fn._cache_size() - prefill_before <= rows.bit_length() + 3


def test_the_tail_compacts_at_most_twice_to_a_quarter_of_the_slots(model):
    """Compaction halves the running batch to the power of two holding the live rows, but never below a
    quarter of the starting slots: each size is one more decode program."""
    assert engine.compacted_size(3, 64, None, 64) == 16  # 4 would be a third halving
    assert engine.compacted_size(20, 64, None, 64) == 32
    assert engine.compacted_size(1, 16, None, 64) is None  # already at the quarter
    assert engine.compacted_size(40, 64, None, 64) is None  # does not halve it
    # eight rows finishing a few a chunk: 8 slots -> 4 -> 2, and the last long row stays at 2, not 1
    limits = [2, 3, 6, 7, 40, 10, 11, 14]
    reqs = [engine.Request(p, m, i) for i, (p, m) in enumerate(zip(PROMPTS, limits))]
    settings = settings_for(model, eos_ids=[])
    stats = engine.EngineStats()
    got = engine.generate(model.config, settings, model.params(), reqs, max_rows=8, block_size=16, chunk=4, stats=stats)
    assert stats.slots == 8 and stats.compactions == 2
    want = static_reference(model, settings, PROMPTS[:8], limits)
    assert [g.output_ids for g in got] == [w.output_ids for w in want]


def test_prefill_packs_prompts_into_the_token_budget(model):
    """Each row of a pack starts with the first waiting prompt and is filled best-fit from the prompts after
    it, never straddling a row; a prompt longer than the budget gets its own power-of-two pack; a pack's
    prompts attend only to themselves, so the result equals the static sampler's whatever the budget."""
    reqs = requests_for()  # prompt lengths 5, 23, 1, 40, 9, 16, 17, 3, 30, 12
    waiting, free = collections.deque(range(len(reqs))), list(range(8))

    def take(rows):
        free[:] = range(8)
        return engine.pack_prompts(reqs, waiting, free, num_samples=2, budget=32, rows=rows, slots=8)

    pack, taken, rows = take(1)
    assert taken == [0, 1] and rows == [0, 1, 2, 3]  # 5 + 23 (the longest that fits 27); 32 / 16 prompts a row
    assert pack.tokens.shape == (1, 32) and pack.lengths.tolist() == [5, 23] and pack.last.tolist() == [4, 27]
    assert pack.slots.tolist() == [0, 1, 2, 3] and pack.token_slots.tolist()[:2] == [0, 1]
    assert pack.token_slots.tolist()[-2:] == [8, 8]  # padding positions go out of range: dropped
    pack, taken, _ = take(4)
    assert taken == [2, 8] and pack.tokens.shape == (1, 32)  # 1 + 30 past the 40, which is longer than a row
    assert pack.lengths.tolist() == [1, 30] and pack.last.tolist() == [0, 30]
    pack, taken, _ = take(4)
    assert taken == [3] and pack.tokens.shape == (1, 64)  # ... so it gets a power-of-two pack of its own
    pack, taken, _ = take(4)
    assert taken == [4, 6, 5, 9] and pack.tokens.shape == (2, 32)  # 9 + 17 | 16 + 12: two rows, the 8 slots full
    assert list(waiting) == [7]
    settings = settings_for(model)
    want = static_reference(model, settings, PROMPTS, LIMITS)
    for budget in (16, 64, 256):
        got = engine.generate(
            model.config, settings, model.params(), reqs, max_rows=4, block_size=16, chunk=8, prefill_tokens=budget
        )
        assert [g.output_ids for g in got] == [w.output_ids for w in want], budget


def test_per_request_limits_through_sample(model):
    results = generate.sample(model, PROMPTS, max_new_tokens=LIMITS, eos_ids=[], batch_size=3)
    assert [len(r.output_ids) for r in results] == LIMITS
    with pytest.raises(Exception, match="3 entries for 10 prompts"):
        generate.sample(model, PROMPTS, max_new_tokens=[1, 2, 3])


def test_sharded_engine_equals_one_device():
    config = preset("tiny").replace(num_heads=8, num_kv_heads=4, hidden_size=64)
    reqs = requests_for([[t % 120 + 1 for t in p] for p in PROMPTS])
    settings = make_settings(
        config,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        eos_ids=[],
        max_think_tokens=None,
        tokenizer=None,
        think_end_ids_override=None,
    )
    single = engine.generate(
        config,
        settings,
        qwen2.Qwen2(config, rngs=nnx.Rngs(0)).params(),
        reqs,
        num_samples=2,
        seed=3,
        max_rows=8,
        block_size=16,
        chunk=6,
    )
    mesh = parallel.make_mesh(2, 2, 2)
    sharded_model = parallel.shard_model(qwen2.Qwen2(config, rngs=nnx.Rngs(0)), mesh)
    sharded = engine.generate(
        config,
        settings,
        sharded_model.params(),
        reqs,
        num_samples=2,
        seed=3,
        max_rows=8,
        mesh=mesh,
        block_size=16,
        chunk=6,
    )
    assert [r.output_ids for r in sharded] == [r.output_ids for r in single]


def test_row_windows_read_each_rows_own_prefix_only():
    """The CPU step (row_windows): each row reads the smallest fine window holding its own prefix; NaN
    beyond that window in its own row never reaches its logits, which equal the whole-cache step's."""
    config = preset("tiny")
    params = qwen2.Qwen2(config, rngs=nnx.Rngs(1)).params()
    B, S, block = 3, 256, 32
    assert qwen2.fine_attention_windows(S, block) == (32, 64, 96, 128, 160, 192, 224, 256)
    big = qwen2.fine_attention_windows(9216, 128)
    assert big[:8] == tuple(range(128, 1025, 128)) and big[-1] == 9216 and len(big) == 30
    assert all(b - a <= max(128, a // 8) for a, b in zip(big, big[1:]))  # at most a block or 12.5% over

    windows = qwen2.fine_attention_windows(S, block)
    lengths = jnp.asarray([5, 70, 33], jnp.int32)
    active = jnp.asarray([True, True, True])
    idx = qwen2.row_window_indices(lengths, active, windows)
    assert [windows[int(i)] for i in idx] == [32, 96, 64]
    idx = qwen2.row_window_indices(lengths, jnp.asarray([True, False, True]), windows)
    assert [windows[int(i)] for i in idx] == [32, 32, 64]

    shape = (config.num_layers, B, S, config.num_kv_heads, config.head_dim)
    own = jnp.asarray([32, 96, 64])[None, :, None, None, None]
    filled = jnp.arange(S)[None, None, :, None, None] < own
    keys = jnp.where(filled, jax.random.normal(jax.random.key(0), shape), jnp.nan)
    values = jnp.where(filled, jax.random.normal(jax.random.key(1), shape), jnp.nan)
    tokens = jnp.asarray([3, 4, 5], jnp.int32)
    step = jax.jit(
        lambda c: qwen2.decode_step(config, params, tokens, c, active=active, block_size=block, row_windows=True)
    )
    logits, new = step(qwen2.KVCache(keys, values, lengths))
    assert np.isfinite(np.asarray(logits)).all()
    assert np.asarray(new.lengths).tolist() == [6, 71, 34]
    clean = jnp.nan_to_num(keys), jnp.nan_to_num(values)
    reference, _ = qwen2.decode_step(config, params, tokens, qwen2.KVCache(*clean, lengths))
    np.testing.assert_allclose(logits, reference, atol=1e-5)
    # the whole cache would read row 0's NaN
    whole, _ = qwen2.decode_step(config, params, tokens, qwen2.KVCache(keys, values, lengths))
    assert np.isnan(np.asarray(whole)[0]).all()


# The labels a profile of `bench` shows for each piece of a prefill and of a decode step.
PREFILL_SCOPES = {"prefill", "embed", "norm", "qkv", "rope", "attention", "attn_out", "mlp", "logits", "cache_write"}
DECODE_SCOPES = {
    "decode_step",
    "embed",
    "norm",
    "qkv",
    "rope",
    "attention",
    "attn_out",
    "mlp",
    "logits",
    "cache_write",
    "sampling",
}


def scope_names(lowered) -> set[str]:
    """The named scopes of a lowered program: the components of its ops' name stacks, loc("jit(f)/mlp/dot"(...)),
    all but the last, which is the op's own name. A frame's function name (loc("rope"(...)), no slash) and a
    file location (loc("/path/qwen2.py":12:3)) never count."""
    names = re.findall(r'loc\("([^"]*/[^"]*)"[()]', lowered.as_text(debug_info=True))
    return {part for name in names for part in name.split("/")[:-1]}


@pytest.mark.parametrize("path", ["rows", "layers"])
def test_prefill_and_decode_step_carry_their_stage_names(path):
    config = preset("tiny")
    params = qwen2.Qwen2(config, rngs=nnx.Rngs(0)).params()
    settings = make_settings(
        config,
        temperature=1.0,
        top_p=0.9,
        top_k=5,
        eos_ids=[1],
        max_think_tokens=4,
        tokenizer=None,
        think_end_ids_override=[2, 3],
    )
    reqs = [engine.Request([3, 4, 5], 4, 0), engine.Request([6, 7], 4, 1)]
    state = engine.empty_state_fn(config, 2, 32, None, path)
    pack, _, _ = engine.pack_prompts(
        reqs, collections.deque(range(2)), [0, 1], num_samples=1, budget=16, rows=2, slots=2
    )
    prefill = engine.prefill_fn.lower(config, 1, None, params, state, pack, np.uint32(0))
    assert PREFILL_SCOPES <= scope_names(prefill), PREFILL_SCOPES - scope_names(prefill)
    attention = None if path == "rows" else "xla"
    decode_params = params if path == "rows" else engine.unstack_fn(params)
    decode = engine.decode_fn.lower(config, settings, 2, 16, attention, None, decode_params, state, np.int32(2))
    assert DECODE_SCOPES <= scope_names(decode), DECODE_SCOPES - scope_names(decode)
