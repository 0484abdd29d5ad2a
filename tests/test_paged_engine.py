"""The engine's paged KV cache ("layers" path, XLA paged attention on this CPU) against the static
sampler and against the same engine with a pool large enough for every row: page edges, shared prompt
pages, preemption and recomputation, more samples than free pages, a mesh; and the pool's own count of
its pages once the run is over."""

import numpy as np
import pytest
from flax import nnx
from test_engine import LIMITS, PROMPTS, model, requests_for, settings_for, static_reference  # noqa: F401 - model: a fixture

from rrm_jax import engine, pages, parallel, static_sampler
from rrm_jax.errors import UserError
from rrm_jax.model import qwen2
from rrm_jax.model.config import preset
from rrm_jax.sampling import make_settings

P = 16  # positions a page: rows of these prompts span one to three pages
# Every row ends exactly on a page edge; the 16-token prompt is a whole page (shared by its samples).
EDGE_LIMITS = [11, 9, 31, 8, 7, 16, 15, 13, 18, 20]


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
    kw = {"max_rows": 4, "block_size": 64, "chunk": 4, "path": "layers", "page_size": P, "stats": stats, **kw}
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
    assert stats.pool_pages == 4 * stats.capacity // P + 1 and stats.page_size == P
    assert stats.preemptions == 0 and stats.prefills == len(PROMPTS) and stats.compactions >= 1
    assert stats.peak_concurrent_rows == 4
    assert_every_page_returned(pools[-1])


def test_a_pool_too_small_for_every_row_preempts_and_samples_as_a_large_one(model, pools):  # noqa: F811
    """Temperature 1, two samples a prompt: a pool of 4 usable pages (the longest row takes 3) makes
    prompts wait and rows be preempted and recomputed; every sample is the large pool's, and each
    prompt's completion is reported once."""
    settings = settings_for(model, temperature=1.0)
    long_rows = [2, 6, 8, 9]  # 31 to 44 positions: rows of two and three pages, growing together
    reqs = requests_for([PROMPTS[i] for i in long_rows], [LIMITS[i] for i in long_rows])
    large, _ = run(model, settings, reqs, num_samples=2, seed=7)
    done = []
    small, stats = run(model, settings, reqs, num_samples=2, seed=7, kv_pages=5, progress=done.append)
    assert stats.preemptions > 0 and stats.prefills > len(reqs)  # preempted samples were prefilled again
    assert stats.peak_pages_in_use == 4
    assert [s.output_ids for s in small] == [g.output_ids for g in large]
    for s, g in zip(small, large):
        np.testing.assert_allclose(s.logprobs, g.logprobs, atol=1e-5)
    assert sum(done) == len(reqs)
    assert_every_page_returned(pools[-1])


def test_a_prompts_samples_share_its_prompt_pages(model):  # noqa: F811
    """40 prompt tokens are two full pages, shared, and a partly filled one, copied to each of the four
    samples; two more tokens stay in that page."""
    settings = settings_for(model)
    prompt = PROMPTS[3]
    got, stats = run(model, settings, [engine.Request(prompt, 2, 0)], num_samples=4)
    assert stats.peak_pages_in_use == 2 + 4
    want = static_reference(model, settings, [prompt], [2], num_samples=4)
    assert [g.output_ids for g in got] == [w.output_ids for w in want]


def test_more_samples_than_the_pool_has_pages_start_in_turns(model, pools):  # noqa: F811
    """Six samples of a 9-token prompt need six partly filled pages; a pool of three usable pages starts
    them three at a time, with the static sampler's samples."""
    settings = settings_for(model, temperature=1.0)
    prompts, limits = [PROMPTS[4], PROMPTS[7]], [6, 5]
    reqs = requests_for(prompts, limits)
    got, stats = run(model, settings, reqs, num_samples=6, max_rows=8, seed=2, kv_pages=4)
    assert stats.prefills >= 2 + 1 and stats.peak_pages_in_use == 3
    want = static_reference(model, settings, prompts, limits, num_samples=6, seed=2)
    assert [g.output_ids for g in got] == [w.output_ids for w in want]
    assert_every_page_returned(pools[-1])


def test_sharded_small_pools_equal_the_static_sampler(pools):
    """Rows and their pages over 4 batch shards (data x fsdp), each shard's pool of three usable pages
    preempting on its own, against the static sampler on one device."""
    config = preset("tiny").replace(num_heads=8, num_kv_heads=4, hidden_size=64)
    prompts = [[t % 120 + 1 for t in p] for p in PROMPTS[:6]]
    reqs = requests_for(prompts)
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
    params = qwen2.Qwen2(config, rngs=nnx.Rngs(0)).params()
    want = static_sampler.sample_batch(
        config, settings, params, prompts, max(LIMITS), limits=LIMITS[:6], num_samples=2, seed=3
    )
    kw = {"num_samples": 2, "seed": 3, "max_rows": 8, "block_size": 64, "chunk": 4, "path": "layers", "page_size": P}
    mesh = parallel.make_mesh(2, 2, 2)
    sharded_model = parallel.shard_model(qwen2.Qwen2(config, rngs=nnx.Rngs(0)), mesh)
    stats = engine.EngineStats()
    sharded = engine.generate(
        config, settings, sharded_model.params(), reqs, mesh=mesh, kv_pages=4 * 4, stats=stats, **kw
    )
    assert stats.preemptions > 0
    assert [r.output_ids for r in sharded] == [w.output_ids for w in want]
    assert_every_page_returned(pools[-1])
    assert len(pools[-1].pools) == 4


def test_paging_options_that_cannot_apply_are_refused(model):  # noqa: F811
    settings = settings_for(model)
    reqs = requests_for()
    for kw, message in (
        ({"path": "rows", "paged": True}, 'runs on the "layers" decode path'),
        ({"path": "rows", "kv_pages": 64}, "does not use"),
        ({"path": "layers", "page_size": 16, "kv_pages": 3}, "cannot hold one row of 47 positions"),
    ):
        with pytest.raises(UserError, match=message):
            engine.generate(model.config, settings, model.params(), reqs, **kw)
