"""The sampler against transformers `generate` and against exact distributions."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from model_utils import make_hf_model
from scipy import stats

from rrm_jax import checkpoint, cli, generate, load_model, parallel, sampling
from rrm_jax.errors import UserError
from rrm_jax.model import qwen2
from rrm_jax.model.config import preset

PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30], [40]]


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    folder, ref = make_hf_model(tmp_path_factory.mktemp("gen"), tokenizer=True)
    model, _ = load_model(folder)
    return folder, ref, model


def hf_greedy(ref, prompt, n, eos=None):
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([prompt]),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )
    return out[0, len(prompt) :].tolist()


def full_logprobs(ref, prompt, output):
    with torch.no_grad():
        logits = ref(torch.tensor([prompt + output])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    return [lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(output)]


def test_greedy_equals_transformers_for_a_mixed_length_batch(hf_pair):
    _, ref, model = hf_pair
    results = generate.sample(model, PROMPTS, max_new_tokens=40, eos_ids=[])
    for prompt, r in zip(PROMPTS, results):
        assert r.output_ids == hf_greedy(ref, prompt, 40)
        assert r.finish_reason == "length"
        np.testing.assert_allclose(r.logprobs, full_logprobs(ref, prompt, r.output_ids), atol=1e-4)


def test_eos_is_honoured_and_kept_as_last_token(hf_pair):
    _, ref, model = hf_pair
    free = generate.sample(model, PROMPTS, max_new_tokens=40, eos_ids=[])
    eos = free[2].output_ids[7]  # a token the third prompt produces mid-way
    results = generate.sample(model, PROMPTS, max_new_tokens=40, eos_ids=[eos, 999])
    for prompt, r in zip(PROMPTS, results):
        want = hf_greedy(ref, prompt, 40, eos=eos)
        assert r.output_ids == want
        assert r.finish_reason == ("eos" if want[-1] == eos else "length")
    assert results[2].finish_reason == "eos" and len(results[2].output_ids) <= 8


def test_num_samples_share_the_prompt_and_stay_prompt_major(hf_pair):
    _, ref, model = hf_pair
    results = generate.sample(model, PROMPTS[:2], max_new_tokens=33, num_samples=3, eos_ids=[])
    assert len(results) == 6
    for i, r in enumerate(results):
        assert r.output_ids == hf_greedy(ref, PROMPTS[i // 3], 33)


def test_kv_cache_decoding_equals_full_forward():
    config = preset("tiny")
    model = qwen2.Qwen2(config, rngs=nnx.Rngs(3))
    params = model.params()
    seq = jnp.asarray([[3, 9, 4, 1, 7, 7, 2, 30, 31, 5]], jnp.int32)
    full = qwen2.forward(config, params, seq)[0]
    P = 4
    logits, cache = qwen2.prefill(config, params, jnp.pad(seq[:, :P], ((0, 0), (0, 4))), jnp.asarray([P]), 16)
    np.testing.assert_allclose(logits[0], full[P - 1], atol=1e-5)
    for t in range(P, seq.shape[1]):
        logits, cache = qwen2.decode_step(config, params, seq[:, t], cache)
        np.testing.assert_allclose(logits[0], full[t], atol=1e-5)


def exact_next_token_probs(logits, temperature, top_k, top_p):
    """Reference filter in float64 numpy: temperature, top-k, then smallest set reaching top_p."""
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros_like(z, bool)
    candidates = order[:top_k] if top_k else order
    p = np.exp(z[candidates] - z[candidates].max())
    p /= p.sum()
    mass = 0.0
    for idx, q in zip(candidates, p):
        keep[idx] = True
        mass += q
        if mass >= top_p:
            break
    probs = np.where(keep, np.exp(z - z.max()), 0.0)
    return probs / probs.sum()


@pytest.mark.parametrize("vocab,n", [(1000, 4096), (151_936, 256)])
def test_inverse_cdf_draw_matches_float64_search_and_never_picks_a_zero_weight_token(vocab, n):
    """sampling.draw_from against numpy's float64 search of the same cumulative distribution, draw by draw:
    the same token except where u falls within float32 rounding of a boundary, and never a token of weight
    0, even at u = 0 and u just below 1 (vocabularies that are not a whole number of its blocks)."""
    rng = np.random.default_rng(0)
    weights = rng.gamma(0.3, size=(n, vocab)) * (rng.random((n, vocab)) < 0.7)  # peaked, with 30% zeros
    weights[:, :5] = 0.0  # a zero-weight head and tail: what u = 0 or u -> 1 would pick by mistake
    weights[:, -5:] = 0.0
    u = rng.random(n).astype(np.float32)
    u[:2] = [0.0, np.nextafter(np.float32(1), np.float32(0))]
    got = np.asarray(sampling.draw_from(jnp.asarray(weights, jnp.float32), jnp.asarray(u)))
    assert (weights[np.arange(n), got] > 0).all(), "drew a token of weight 0"
    cum = np.cumsum(weights, axis=1)
    want = np.array([np.searchsorted(c, (1.0 - float(x)) * c[-1]) for c, x in zip(cum, u)])
    assert (got == want).mean() >= 0.99, (got != want).sum()
    near = np.abs(cum[np.arange(n), np.minimum(got, want)] / cum[:, -1] - (1.0 - u)) < 1e-5
    assert near[got != want].all(), "a disagreement away from a boundary"


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.9, 10, 0.6)])
def test_sampling_distribution_matches_exact_filtered_distribution(temperature, top_k, top_p):
    config = preset("tiny").replace(vocab_size=24)
    model = qwen2.Qwen2(config, rngs=nnx.Rngs(0))
    nnx.update(model, {"embed": model.params()["embed"] * 40.0})  # a peaked, non-trivial distribution
    prompt = [3, 1, 4]
    logits = np.asarray(qwen2.forward(config, model.params(), jnp.asarray([prompt]))[0, -1])
    want = exact_next_token_probs(logits, temperature, top_k, top_p)

    n = 4000
    results = generate.sample(
        model,
        [prompt],
        max_new_tokens=1,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        num_samples=n,
        seed=7,
        eos_ids=[],
    )
    counts = np.bincount([r.output_ids[0] for r in results], minlength=config.vocab_size)
    assert counts[want == 0].sum() == 0, "sampled a token the filters remove"
    support = want > 0
    if support.sum() > 1:
        chi2 = stats.chisquare(counts[support], n * want[support])
        assert chi2.pvalue > 1e-3, (counts[support], n * want[support])
    # the sampling logprob is the filtered distribution's, the plain logprob the model's
    r = results[0]
    np.testing.assert_allclose(r.sampling_logprobs[0], np.log(want[r.output_ids[0]]), atol=1e-4)
    plain = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    np.testing.assert_allclose(r.logprobs[0], plain[r.output_ids[0]], atol=1e-4)


def test_later_tokens_follow_the_exact_joint_distribution_after_a_forced_token():
    """Steps after the first: a sample is [t0, F, t2, t3] with F forced by a one-token thinking budget,
    checked against the exact joint P(t0) P(t2 | t0 F) P(t3 | t0 F t2) from the model's full forward.
    A joint test, because a per-step key bug (the same key at every step, or keys not depending on the
    step) keeps each step's marginal nearly right but ties the steps' draws together. Broken that way on
    purpose (fold_in(stream, 0) for every step, or the stream's key itself), chi-square went from 297 to
    5.6e4 on 300 degrees of freedom and the rate of t0 == t2 from 0.03 to 0.20."""
    config = preset("tiny").replace(vocab_size=24)
    model = qwen2.Qwen2(config, rngs=nnx.Rngs(0))
    nnx.update(model, {"embed": model.params()["embed"] * 2.0})  # ~1.8 nats a step: hundreds of likely outcomes
    prompt, forced = [3, 1, 4], 0
    allowed = list(range(1, config.vocab_size))  # F is never sampled, so it is always the forced token at step 1
    A = len(allowed)

    # One causal forward over every [prompt, t0, F, t2] gives all three steps' exact distributions (over
    # the allowed tokens, float64), read at the positions before t0, t2 and t3.
    seqs = [prompt + [a, forced, b] for a in allowed for b in allowed]
    logits = np.asarray(qwen2.forward(config, model.params(), jnp.asarray(seqs)), np.float64)[..., allowed]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = (probs / probs.sum(-1, keepdims=True)).reshape(A, A, len(seqs[0]), A)
    p0, p2, p3 = probs[0, 0, len(prompt) - 1], probs[:, 0, len(prompt) + 1], probs[:, :, len(prompt) + 2]
    joint = p0[:, None, None] * p2[:, :, None] * p3  # [t0, t2, t3]

    n = 16384
    results = generate.sample(
        model,
        [prompt],
        max_new_tokens=4,
        temperature=1.0,
        num_samples=n,
        seed=7,
        eos_ids=[],
        max_think_tokens=1,
        think_end_ids_override=(forced,),
        allowed_token_ids=allowed,
    )
    out = np.array([r.output_ids for r in results])
    assert out.shape == (n, 4) and (out[:, 1] == forced).all() and np.isin(out[:, [0, 2, 3]], allowed).all()
    t0, t2, t3 = (np.searchsorted(allowed, out[:, k]) for k in (0, 2, 3))
    counts = np.zeros(joint.shape)
    np.add.at(counts, (t0, t2, t3), 1)

    # Chi-square over the outcomes expected at least 5 times, the rest pooled into one cell (the usual
    # condition for the chi-square approximation). With correct sampling the p-value is uniform, so this
    # fails a correct sampler with probability 1e-6 (for a seed chosen blindly; the seed is fixed).
    expected = n * joint
    common = expected >= 5
    assert common.sum() > 100
    observed_cells = np.append(counts[common], counts[~common].sum())
    expected_cells = np.append(expected[common], expected[~common].sum())
    chi2 = stats.chisquare(observed_cells, expected_cells)
    assert chi2.pvalue > 1e-6, (chi2.statistic, len(observed_cells) - 1)

    # Successive draws repeat as often as the exact distribution says (a reused key repeats them far more
    # often): each rate within 5 standard errors, a false failure about 6e-7 each.
    same = np.eye(A, dtype=bool)
    for name, hits, p in [
        ("t0 == t2", t0 == t2, (joint * same[:, :, None]).sum()),
        ("t2 == t3", t2 == t3, (joint * same[None]).sum()),
        ("t0 == t3", t0 == t3, (joint * same[:, None, :]).sum()),
    ]:
        assert abs(hits.mean() - p) <= 5 * np.sqrt(p * (1 - p) / n), (name, hits.mean(), p)


def test_allowed_tokens_greedy_equals_transformers_with_the_rest_suppressed(hf_pair):
    _, ref, model = hf_pair
    allowed = list(range(30, 60, 3))  # tokens the unconstrained greedy run mostly does not pick
    suppressed = [t for t in range(ref.config.vocab_size) if t not in allowed]
    results = generate.sample(model, PROMPTS, max_new_tokens=12, eos_ids=[], allowed_token_ids=allowed)
    for prompt, r in zip(PROMPTS, results):
        with torch.no_grad():
            out = ref.generate(
                torch.tensor([prompt]),
                max_new_tokens=12,
                do_sample=False,
                pad_token_id=0,
                suppress_tokens=suppressed,
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            )
        assert r.output_ids == out[0, len(prompt) :].tolist()
        with torch.no_grad():  # logprobs: the model renormalised over the allowed tokens
            logits = ref(torch.tensor([prompt + r.output_ids])).logits[0].double()[:, allowed]
        lp = torch.log_softmax(logits, -1)
        want = [lp[len(prompt) - 1 + i, allowed.index(t)].item() for i, t in enumerate(r.output_ids)]
        np.testing.assert_allclose(r.logprobs, want, atol=1e-4)


def test_allowed_tokens_sampling_follows_the_renormalised_distribution():
    config = preset("tiny").replace(vocab_size=24)
    model = qwen2.Qwen2(config, rngs=nnx.Rngs(0))
    prompt, allowed = [3, 1, 4], [2, 5, 7, 13, 17, 19]  # without 11, the unconstrained model's favourite
    logits = np.asarray(qwen2.forward(config, model.params(), jnp.asarray([prompt]))[0, -1]).astype(np.float64)
    z = np.exp(logits[allowed] - logits[allowed].max())
    want = np.zeros(config.vocab_size)
    want[allowed] = z / z.sum()
    n = 4000
    results = generate.sample(
        model, [prompt], max_new_tokens=1, temperature=1.0, num_samples=n, seed=5, eos_ids=[], allowed_token_ids=allowed
    )
    counts = np.bincount([r.output_ids[0] for r in results], minlength=config.vocab_size)
    assert counts[want == 0].sum() == 0, "sampled a token outside the allowed set"
    support = want > 1e-6
    assert stats.chisquare(counts[support], n * want[support] / want[support].sum()).pvalue > 1e-3
    np.testing.assert_allclose(results[0].logprobs[0], np.log(want[results[0].output_ids[0]]), atol=1e-4)


def test_allowed_tokens_out_of_the_vocabulary_are_refused(hf_pair):
    _, ref, model = hf_pair
    with pytest.raises(UserError, match="allowed_token_ids"):
        generate.sample(model, PROMPTS, max_new_tokens=2, allowed_token_ids=[1, ref.config.vocab_size])


def test_same_seed_same_samples_regardless_of_batching(hf_pair):
    _, _, model = hf_pair
    kw = dict(max_new_tokens=12, temperature=1.0, num_samples=2, seed=3, eos_ids=[])
    together = generate.sample(model, PROMPTS, **kw)
    one_by_one = generate.sample(model, PROMPTS, batch_size=1, **kw)
    assert [r.output_ids for r in together] == [r.output_ids for r in one_by_one]
    other_seed = generate.sample(model, PROMPTS, **{**kw, "seed": 4})
    assert [r.output_ids for r in together] != [r.output_ids for r in other_seed]


def test_thinking_budget_forces_end_of_thinking_then_continues(hf_pair):
    _, ref, model = hf_pair
    forced = (50, 51, 52)  # stands for the tokens of "\n</think>\n\n"; the last one closes thinking
    free = generate.sample(model, PROMPTS, max_new_tokens=20, eos_ids=[])
    results = generate.sample(
        model, PROMPTS, max_new_tokens=20, eos_ids=[], max_think_tokens=5, think_end_ids_override=forced
    )
    checked = 0
    for prompt, f, r in zip(PROMPTS, free, results):
        if 52 in f.output_ids[:5]:  # closed its thinking on its own before the budget: nothing forced
            assert r.output_ids == f.output_ids
            continue
        assert r.output_ids[:5] == f.output_ids[:5]
        assert tuple(r.output_ids[5:8]) == forced
        # after the forced tokens it goes on as the model would from that text
        assert r.output_ids[8:] == hf_greedy(ref, prompt + r.output_ids[:8], 12)
        checked += 1
    assert checked >= 3


def test_compiles_once_per_bucket():
    config = preset("tiny")
    model = qwen2.Qwen2(config, rngs=nnx.Rngs(0))
    generate.sample(model, [[1] * 3], max_new_tokens=4, eos_ids=[])  # bucket 16
    prefill_before = generate.prefill_fn._cache_size()
    decode_before = generate.decode_fn._cache_size()
    for n in (1, 5, 9, 16):
        generate.sample(model, [[2] * n], max_new_tokens=4, eos_ids=[])
    assert generate.prefill_fn._cache_size() == prefill_before
    assert generate.decode_fn._cache_size() == decode_before
    generate.sample(model, [[2] * 17], max_new_tokens=4, eos_ids=[])  # next bucket: one more compile
    assert generate.prefill_fn._cache_size() == prefill_before + 1
    assert generate.bucket_length(17) == 32 and generate.bucket_length(3, [8, 24]) == 8


def test_sharded_greedy_equals_single_device():
    config = preset("tiny").replace(num_heads=8, num_kv_heads=4, hidden_size=64)
    prompts = [[3, 4, 5], [9] * 7, [1, 2], [7, 7, 7, 7, 7]]
    single = generate.sample(qwen2.Qwen2(config, rngs=nnx.Rngs(0)), prompts, max_new_tokens=16, eos_ids=[])
    for shape in [(2, 2, 2)]:  # data, fsdp and tp all > 1
        mesh = parallel.make_mesh(*shape)
        model = parallel.shard_model(qwen2.Qwen2(config, rngs=nnx.Rngs(0)), mesh)
        sharded = generate.sample(model, prompts, max_new_tokens=16, eos_ids=[])
        assert [r.output_ids for r in sharded] == [r.output_ids for r in single]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "rrm_jax.cli", *args], capture_output=True, text=True)


def test_generate_cli_writes_rows(hf_pair, tmp_path):
    folder, ref, _ = hf_pair
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"input_ids": PROMPTS[0], "id": "a"}) + "\n" + json.dumps({"prompt": "the judge"}) + "\n")
    out = tmp_path / "out.jsonl"
    proc = run_cli(
        "generate", "--model", str(folder), "--input", str(src), "--output", str(out), "--max-new-tokens", "8"
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["id"] == "a" and len(rows) == 2
    eos = 2  # the test model's eos_token_id
    want = hf_greedy(ref, PROMPTS[0], 8, eos=eos)
    assert rows[0]["output_ids"] == want and isinstance(rows[1]["text"], str)
    assert {"finish_reason", "logprobs"} <= rows[1].keys()


def test_generate_cli_default_length_fits_the_context_and_shows_answers(hf_pair, tmp_path):
    folder, _, _ = hf_pair
    src = tmp_path / "in.jsonl"
    long_prompt = list(range(3, 253))  # 250 of the model's 256 positions: 6 left to generate
    src.write_text(json.dumps({"input_ids": long_prompt}) + "\n" + json.dumps({"prompt": "the judge"}) + "\n")
    out = tmp_path / "out.jsonl"
    proc = run_cli("generate", "--model", str(folder), "--input", str(src), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows[0]["output_ids"]) <= 6 and (rows[0]["finish_reason"] == "eos" or len(rows[0]["output_ids"]) == 6)
    assert "--- prompt 1/2 (" in proc.stdout and "--- prompt 2/2 (" in proc.stdout and "'the judge'" in proc.stdout
    assert rows[1]["text"] in proc.stdout


def test_generate_text_prompts_start_with_bos_as_the_toy_policy_trains():
    from rrm_jax.data.char_tokenizer import build_char_tokenizer
    from rrm_jax.generate_cli import encode_rows
    from rrm_jax.rrm import prompt

    tokenizer = build_char_tokenizer()
    (ids,) = encode_rows([{"prompt": "Q: 3+4?"}], tokenizer, "in.jsonl")
    assert ids[0] == tokenizer.bos_token_id
    assert ids == prompt.encode(tokenizer, tokenizer.bos_token + "Q: 3+4?")  # rrm_jax.data.toy's policy prompts


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"prompt": "ok"}\n{not json\n', "in.jsonl line 2: not valid JSON"),
        ('\n{"prompt": "ok"}\n\n{"prompt": ""}\n', "in.jsonl line 4: an empty prompt"),  # blank lines still count
        ('{"input_ids": [' + ",".join(["1"] * 300) + "]}\n", "exceeds the model's context"),
        ('{"text": "no prompt"}\n', "in.jsonl line 1: needs a string 'prompt'"),
    ],
)
def test_generate_cli_bad_input(hf_pair, tmp_path, content, message):
    folder, _, _ = hf_pair
    src = tmp_path / "in.jsonl"
    src.write_text(content)
    out = tmp_path / "out.jsonl"
    proc = run_cli("generate", "--model", str(folder), "--input", str(src), "--output", str(out))
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob("out.jsonl*"))


def test_generate_cli_bad_kv_pool_fails_before_reading_anything(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert cli.main(["generate", "--model", "x", "--input", "y", "--output", str(out), "--kv-pool-gb", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "rrm-jax: error: --kv-pool-gb must be a positive number of GB, got -1.0"
    assert not list(tmp_path.iterdir())


def test_sample_sizes_a_kv_pool_per_device_and_ignores_it_on_one_cpu_device():
    """kv_pool_gb -> the engine's pages, by hand: the tiny model over a 2x2x2 mesh holds 2 of its 4 kv heads a
    device, so a token takes 2 layers x 2 x 2 heads x 16 dims x 4 bytes = 512 bytes there and a page of 64
    positions 32,768; 2e-4 GB is 6 pages a batch shard, 24 over the 4 shards. Results equal the run without
    a pool; on one CPU device (the contiguous "rows" path) the pool is ignored."""
    config = preset("tiny").replace(num_heads=8, num_kv_heads=4, hidden_size=64)
    assert config.num_layers == 2 and config.head_dim == 16 and config.dtype == "float32"
    assert generate.pool_pages(config, parallel.make_mesh(2, 2, 2), 2e-4) == 4 * (200_000 // (64 * 512)) == 24
    model = parallel.shard_model(qwen2.Qwen2(config, rngs=nnx.Rngs(0)), parallel.make_mesh(2, 2, 2))
    prompts = [[(5 * i + j) % 120 + 1 for j in range(n)] for i, n in enumerate([3, 9, 17, 30, 5, 12])]
    stats = generate.engine.EngineStats()
    paged = generate.sample(model, prompts, max_new_tokens=8, eos_ids=[], kv_pool_gb=2e-4, stats=stats)
    assert (stats.path, stats.pool_pages) == ("layers", 24)
    assert [r.output_ids for r in paged] == [
        r.output_ids for r in generate.sample(model, prompts, max_new_tokens=8, eos_ids=[])
    ]
    one = qwen2.Qwen2(config, rngs=nnx.Rngs(0))
    stats = generate.engine.EngineStats()
    alone = generate.sample(one, prompts, max_new_tokens=8, eos_ids=[], kv_pool_gb=2e-4, stats=stats)
    assert (stats.path, stats.pool_pages) == ("rows", 0)
    assert [r.output_ids for r in alone] == [r.output_ids for r in paged]


def test_generate_cli_unknown_flag(tmp_path):
    proc = run_cli("generate", "--model", "x", "--input", "y", "--output", "z", "--beam-size", "4")
    assert proc.returncode == 2 and "--beam-size" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "signum, exit_code", [pytest.param(signal.SIGTERM, 0, id="SIGTERM"), pytest.param(signal.SIGINT, 130, id="SIGINT")]
)
def test_generate_cli_stops_on_a_signal_and_resumes(hf_pair, tmp_path, monkeypatch, capsys, signum, exit_code):
    folder, _, _ = hf_pair
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in PROMPTS))
    common = [
        "generate",
        "--model",
        str(folder),
        "--input",
        str(src),
        "--max-new-tokens",
        "4",
        "--prompts-per-call",
        "2",
    ]
    reference, out = tmp_path / "reference.jsonl", tmp_path / "out.jsonl"
    assert cli.main([*common, "--output", str(reference)]) == 0
    capsys.readouterr()

    sample = generate.sample

    def sample_then_signal(*args, **kwargs):  # the signal arrives while the first batch is being sampled
        os.kill(os.getpid(), signum)
        return sample(*args, **kwargs)

    monkeypatch.setattr(generate, "sample", sample_then_signal)
    assert cli.main([*common, "--output", str(out)]) == exit_code
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"{signal.Signals(signum).name}: stopped with 2 prompts finished in {out}.partial")
    assert not out.exists()
    monkeypatch.setattr(generate, "sample", sample)
    assert cli.main([*common, "--output", str(out), "--resume"]) == 0
    assert out.read_text() == reference.read_text()


def test_generate_cli_resume_refuses_a_partial_file_of_another_model(hf_pair, tmp_path, monkeypatch, capsys):
    folder, _, _ = hf_pair
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in PROMPTS))
    common = [
        "generate",
        "--model",
        str(folder),
        "--input",
        str(src),
        "--max-new-tokens",
        "4",
        "--prompts-per-call",
        "2",
        "--output",
        str(out),
    ]
    sample = generate.sample

    def sample_then_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return sample(*args, **kwargs)

    monkeypatch.setattr(generate, "sample", sample_then_signal)
    assert cli.main(common) == 0
    partial = Path(f"{out}.partial")
    header, *rest = partial.read_text().splitlines(keepends=True)
    header = json.loads(header)
    assert header["model_loaded"]["path"] == str(folder.absolute())
    header["model_loaded"] = {
        "path": "/runs/a/checkpoints/100",
        "config_sha256": "ab" * 32,
    }  # what an earlier step recorded
    partial.write_text(json.dumps(header) + "\n" + "".join(rest))
    capsys.readouterr()

    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli.main([*common, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds results of /runs/a/checkpoints/100 (config sha256 abababababab)" in err
    assert f"--model now loads {folder.absolute()} (config sha256 " in err and not out.exists()


def test_generate_reads_json_lists_and_parquet_like_jsonl(tmp_path):
    # the README's promise: `generate --input` takes the same files as judge / eval / rank
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rrm_jax.generate_cli import read_located_prompt_rows

    rows = [{"prompt": "Q: 3+4?", "id": 1}, {"input_ids": [1, 2, 3], "id": 2}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "in.json").write_text(json.dumps(rows, indent=1))
    pq.write_table(
        pa.Table.from_pylist([{"prompt": "Q: 3+4?", "id": 1}, {"prompt": "Q: 1+1?", "id": 2}]), tmp_path / "in.parquet"
    )
    assert [r for _, r in read_located_prompt_rows(str(tmp_path / "in.json"))] == rows
    assert [w for w, _ in read_located_prompt_rows(str(tmp_path / "in.json"))] == [
        f"{tmp_path / 'in.json'} line 2",
        f"{tmp_path / 'in.json'} line 6",
    ]  # where each item starts
    assert [r for _, r in read_located_prompt_rows(str(tmp_path / "in.jsonl"))] == rows
    parquet = read_located_prompt_rows(str(tmp_path / "in.parquet"))
    assert [r["prompt"] for _, r in parquet] == ["Q: 3+4?", "Q: 1+1?"] and parquet[1][0].endswith("in.parquet row 2")
    (tmp_path / "bad.json").write_text(json.dumps([{"text": "no prompt"}]))
    with pytest.raises(UserError, match=r"bad\.json line 1: needs a string 'prompt'"):
        read_located_prompt_rows(str(tmp_path / "bad.json"))
