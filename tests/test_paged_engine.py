"""The engine's paged KV cache ("layers" path, XLA paged attention on this CPU) against the static
sampler and against the same engine with a pool large enough for every row: page edges, shared prompt
pages, preemption and recomputation, more samples than free pages, a mesh; and the pool's own count of
its pages once the run is over."""

import numpy as np
import pytest
from flax import nnx
from test_engine import PROMPTS, model, requests_for, settings_for, static_reference  # noqa: F401 - model: a fixture

from rrm_jax import engine, pages, parallel
from rrm_jax.model import qwen2
from rrm_jax.model.config import preset
from rrm_jax.sampling import make_settings

P = 8  # positions a page: rows of these prompts span one to six pages
# Every row ends exactly on a page edge; the 16- and 40-token prompts are whole pages (all shared).
EDGE_LIMITS = [11, 9, 31, 8, 15, 16, 15, 13, 10, 20]


@pytest.fixture
def pools(monkeypatch):
    """The host page pools of the engine's runs, in order."""
    made, page_pool = [], engine.page_pool

    def record(*args, **kwargs):
        made.append(page_pool(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(engine, "page_pool", record)
    return made


def assert_every_page_returned(pool: pages.ShardedPagePool):
    pool.check()
    for shard in pool.pools:
        assert shard.pages_in_use == 0 and shard.free_pages == shard.usable_pages
        assert len(shard.live_rows()) == 0 and np.all(shard.page_table == pages.NULL_PAGE)


def run(model, settings, reqs, **kw):  # noqa: F811 - the fixture's value
    stats = engine.EngineStats()
    kw = {"max_rows": 4, "block_size": 16, "chunk": 4, "path": "layers", "page_size": P, "stats": stats, **kw}
    return engine.generate(model.config, settings, model.params(), reqs, **kw), stats


def test_greedy_equals_static_sampler_with_rows_ending_on_page_edges(model, pools):  # noqa: F811
    settings = settings_for(model)
    reqs = requests_for(limits=EDGE_LIMITS)
    got, stats = run(model, settings, reqs, num_samples=2)
    want = static_reference(model, settings, PROMPTS, EDGE_LIMITS, num_samples=2)
    assert [g.output_ids for g in got] == [w.output_ids for w in want]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5)
    # the default pool holds every slot's longest row: no row waits for a page, as the contiguous cache
    assert stats.pool_pages == 4 * (48 + 48) // P + 1 and stats.page_size == P
    assert stats.preemptions == 0 and stats.prefills == len(PROMPTS) and stats.compactions >= 1
    assert stats.peak_concurrent_rows == 4
    assert_every_page_returned(pools[-1])


def test_a_pool_too_small_for_every_row_preempts_and_samples_as_a_large_one(model, pools):  # noqa: F811
    """Temperature 1, two samples a prompt: a pool of 10 pages (the longest row takes 6) makes prompts
    wait and rows be preempted and recomputed; every sample is the large pool's, and each prompt's
    completion is reported once."""
    settings = settings_for(model, temperature=1.0)
    reqs = requests_for()
    large, _ = run(model, settings, reqs, num_samples=2, seed=7)
    done = []
    small, stats = run(model, settings, reqs, num_samples=2, seed=7, kv_pages=10, progress=done.append)
    assert stats.preemptions > 0 and stats.prefills > len(PROMPTS)  # preempted samples were prefilled again
    assert stats.peak_pages_in_use <= 9 and stats.peak_concurrent_rows < 4 * 2
    assert [s.output_ids for s in small] == [g.output_ids for g in large]
    for s, g in zip(small, large):
        np.testing.assert_allclose(s.logprobs, g.logprobs, atol=1e-5)
    assert sum(done) == len(PROMPTS)
    assert_every_page_returned(pools[-1])


def test_a_prompts_samples_share_its_prompt_pages(model):  # noqa: F811
    """20 prompt tokens are two full pages, shared, and a partly filled one, copied to each of the four
    samples; two more tokens stay in that page."""
    settings = settings_for(model)
    prompt = PROMPTS[1][:20]
    got, stats = run(model, settings, [engine.Request(prompt, 2, 0)], num_samples=4)
    assert stats.peak_pages_in_use == 2 + 4
    want = static_reference(model, settings, [prompt], [2], num_samples=4)
    assert [g.output_ids for g in got] == [w.output_ids for w in want]


def test_more_samples_than_the_pool_has_pages_start_in_turns(model, pools):  # noqa: F811
    """Six samples of a 9-token prompt need a shared page and six partial ones; a pool of five usable
    pages starts them a few at a time, with the samples of a large pool."""
    settings = settings_for(model, temperature=1.0)
    reqs = [engine.Request(PROMPTS[4], 6, 0), engine.Request(PROMPTS[7], 5, 1)]
    large, _ = run(model, settings, reqs, num_samples=6, max_rows=8, seed=2)
    small, stats = run(model, settings, reqs, num_samples=6, max_rows=8, seed=2, kv_pages=6)
    assert stats.prefills > len(reqs)
    assert [s.output_ids for s in small] == [g.output_ids for g in large]
    assert_every_page_returned(pools[-1])


def test_sharded_small_pool_equals_one_device(pools):
    """Rows and their pages over 4 batch shards (data x fsdp), each shard's small pool preempting on its
    own, against one device with a large pool."""
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
    kw = {"num_samples": 2, "seed": 3, "max_rows": 8, "block_size": 16, "chunk": 4, "path": "layers", "page_size": P}
    params = qwen2.Qwen2(config, rngs=nnx.Rngs(0)).params()
    single = engine.generate(config, settings, params, reqs, **kw)
    mesh = parallel.make_mesh(2, 2, 2)
    sharded_model = parallel.shard_model(qwen2.Qwen2(config, rngs=nnx.Rngs(0)), mesh)
    stats = engine.EngineStats()
    sharded = engine.generate(
        config, settings, sharded_model.params(), reqs, mesh=mesh, kv_pages=4 * 8, stats=stats, **kw
    )
    assert stats.preemptions > 0
    assert [r.output_ids for r in sharded] == [r.output_ids for r in single]
    assert_every_page_returned(pools[-1])
    assert len(pools[-1].pools) == 4
