"""Preference readers, A/B positions, over-length counting and the grain pipeline."""

import json

import numpy as np
import pytest

from rrm_jax.data import preference
from rrm_jax.data.preference import PreferencePair
from rrm_jax.data.prompts import read_prompts
from rrm_jax.data.rows import read_rows
from rrm_jax.data.toy import toy_tokenizer
from rrm_jax.errors import UserError
from rrm_jax.rrm import prompt


@pytest.fixture(scope="module")
def tokenizer():
    return toy_tokenizer()


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


# ---------- readers ----------


def test_jsonl_both_row_shapes(tmp_path):
    path = write_lines(
        tmp_path / "d.jsonl",
        [
            json.dumps({"prompt": "q1", "chosen": "good", "rejected": "bad", "extra": 1}),
            "",
            json.dumps({"query": "q2", "response_1": "worse", "response_2": "better", "label": 2}),
            json.dumps({"query": "q3", "response_1": "better", "response_2": "worse", "label": 1}),
        ],
    )
    pairs = preference.read_preferences(path)
    assert [(p.query, p.chosen, p.rejected) for p in pairs] == [
        ("q1", "good", "bad"),
        ("q2", "better", "worse"),
        ("q3", "better", "worse"),
    ]
    assert [p.origin for p in pairs] == [f"{path} line 1", f"{path} line 3", f"{path} line 4"]


def test_json_list_and_parquet(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(3)]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows, indent=2))
    assert [p.query for p in preference.read_preferences(str(path))] == ["q0", "q1", "q2"]

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{"query": "q", "response_1": "x", "response_2": "y", "label": 2}] * 2)
    pq.write_table(table, tmp_path / "d.parquet")
    pairs = preference.read_preferences(str(tmp_path / "d.parquet"))
    assert [(p.chosen, p.rejected) for p in pairs] == [("y", "x")] * 2
    assert pairs[1].origin.endswith("d.parquet row 2")


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"prompt": "q", "chosen": "a"', "not valid JSON"),
        (
            '{"prompt": "q", "chosen": "a"}',
            "needs the fields prompt, chosen, rejected or query, response_1, response_2, label; it has chosen, prompt",
        ),
        ('{"query": "q", "response_1": "a", "response_2": "b", "label": 3}', "label must be 1 or 2"),
        ('{"query": "q", "response_1": "a", "response_2": "b", "label": true}', "label must be 1 or 2"),
        ('{"prompt": "q", "chosen": 5, "rejected": "b"}', "field 'chosen' must be a string"),
        ('["q", "a", "b"]', "expected an object"),
    ],
)
def test_bad_jsonl_row_names_file_and_line(tmp_path, bad_line, message):
    good = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
    path = write_lines(tmp_path / "bad.jsonl", [good, good, bad_line, good])
    with pytest.raises(UserError) as e:
        preference.read_preferences(path)
    assert str(e.value).startswith(f"{path} line 3: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_json_list_item_names_its_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"prompt": "q", "chosen": "a", "rejected": "b"},\n  {"prompt": "q",\n   "chosen": "a"}\n]\n')
    with pytest.raises(UserError, match=r"bad\.json line 3: a row needs the fields"):
        preference.read_preferences(str(path))
    path.write_text('[\n  {"prompt": "q", "chosen": "a", "rejected": "b"}\n  {"prompt": "q"}\n]')
    with pytest.raises(UserError, match=r"bad\.json line 3: not valid JSON"):
        preference.read_preferences(str(path))
    path.write_text('[\n  {"prompt": "q", "chosen": "a", "rejected": "b"}\n]\n{"prompt": "q"}\n')
    with pytest.raises(UserError, match=r"bad\.json line 4: not valid JSON \(extra data after the list\)"):
        preference.read_preferences(str(path))


def test_every_reader_names_a_row_the_same_way(tmp_path):
    # one reader (rrm_jax.data.rows) for the commands' inputs, preference data and prompt data: an item
    # of a JSON list is named by the line where it starts, also when the file has another suffix
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(2)]
    for name in ("d.json", "d.jsonl"):
        path = tmp_path / name
        path.write_text("[\n" + ",\n\n".join("  " + json.dumps(r) for r in rows) + "\n]\n")
        expected = [f"{path} line 2", f"{path} line 4"]
        assert [where for where, _ in read_rows(str(path))] == expected
        assert [p.origin for p in preference.read_preferences(str(path))] == expected
        assert [r.origin for r in read_prompts(str(path))] == expected
    path = tmp_path / "lines.json"  # JSON lines in a .json file are read as JSONL
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [p.origin for p in preference.read_preferences(str(path))] == [f"{path} line 1", f"{path} line 2"]


def test_unusable_files(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        preference.read_preferences(str(tmp_path / "missing.jsonl"))
    (tmp_path / "d.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(UserError, match=r"d\.csv line 1: not valid JSON"):
        preference.read_preferences(str(tmp_path / "d.csv"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match=r"empty\.jsonl: no rows"):
        preference.read_preferences(str(tmp_path / "empty.jsonl"))
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="not a readable Parquet file"):
        preference.read_preferences(str(tmp_path / "junk.parquet"))


def test_split_heldout():
    pairs = [PreferencePair(f"q{i}", "a", "b") for i in range(100)]
    train, heldout = preference.split_heldout(pairs, 20, seed=1)
    assert len(heldout) == 20 and len(train) == 80
    assert {p.query for p in train}.isdisjoint({p.query for p in heldout})
    assert preference.split_heldout(pairs, 20, seed=1) == (train, heldout)
    assert preference.split_heldout(pairs, 20, seed=2)[1] != heldout
    assert len(preference.split_heldout(pairs, 0.1, seed=0)[1]) == 10
    for bad in (100, 1.0, -1):
        with pytest.raises(UserError, match="must leave some"):
            preference.split_heldout(pairs, bad, seed=0)


# ---------- prompts ----------


def letter_pairs(n):
    rng = np.random.default_rng(0)
    return [
        PreferencePair(f"q{i}", "".join(rng.choice(list("abc"), 4)), "".join(rng.choice(list("xyz"), 4)), f"item {i}")
        for i in range(n)
    ]


def test_positions_are_seeded_and_labels_point_at_the_chosen_response(tokenizer):
    pairs = letter_pairs(400)
    ds = preference.PreferenceDataset(pairs, tokenizer=tokenizer, render=prompt.render, max_prompt_len=64, seed=7)
    examples = [ds[i][0] for i in range(len(ds))]
    labels = np.array([e.label for e in examples])
    assert 160 < (labels == 1).sum() < 240  # a fair coin per pair
    for pair, e in zip(pairs, examples):
        assert (e.response_1, e.response_2)[e.label - 1] == pair.chosen and (e.response_1, e.response_2)[
            2 - e.label
        ] == pair.rejected
        assert e.prompt == prompt.render(tokenizer, pair.query, e.response_1, e.response_2)
        assert e.prompt_ids == prompt.encode(tokenizer, e.prompt)
    again = preference.PreferenceDataset(pairs, tokenizer=tokenizer, render=prompt.render, max_prompt_len=64, seed=7)
    assert [again[i][0].label for i in range(len(again))] == labels.tolist()
    other = preference.PreferenceDataset(pairs, tokenizer=tokenizer, render=prompt.render, max_prompt_len=64, seed=8)
    assert [other[i][0].label for i in range(len(other))] != labels.tolist()


def test_both_orders(tokenizer):
    ds = preference.PreferenceDataset(
        letter_pairs(3), tokenizer=tokenizer, render=prompt.render, max_prompt_len=64, orders="both"
    )
    first, second = ds[1]
    assert (first.label, second.label) == (1, 2)
    assert (first.response_1, first.response_2) == (second.response_2, second.response_1)
    with pytest.raises(UserError, match="orders='all'"):
        preference.PreferenceDataset(
            letter_pairs(3), tokenizer=tokenizer, render=prompt.render, max_prompt_len=64, orders="all"
        )


def test_over_length_items_dropped_and_counted(tokenizer):
    pairs = letter_pairs(10)
    long = {2, 5, 6}
    pairs = [
        PreferencePair(p.query, p.chosen + "z" * 30 if i in long else p.chosen, p.rejected, p.origin)
        for i, p in enumerate(pairs)
    ]
    # prompts: <s> q<i> : 4 letters | 4 letters <think> = 1 + 2 + 1 + 4 + 1 + 4 + 1 = 14 tokens; long ones 44
    ds = preference.PreferenceDataset(pairs, tokenizer=tokenizer, render=prompt.render, max_prompt_len=14)
    assert ds.dropped_over_length == 3 and len(ds) == 7
    assert {ds[i][0].origin for i in range(len(ds))} == {f"item {i}" for i in range(10) if i not in long}
    assert max(len(ds[i][0].prompt_ids) for i in range(len(ds))) == 14
    both = preference.PreferenceDataset(
        pairs, tokenizer=tokenizer, render=prompt.render, max_prompt_len=14, orders="both"
    )
    assert both.dropped_over_length == 3
    with pytest.raises(UserError, match="all 10 preference pairs render to prompts longer than max_prompt_len=13"):
        preference.PreferenceDataset(pairs, tokenizer=tokenizer, render=prompt.render, max_prompt_len=13)
    with pytest.raises(UserError, match="empty"):
        preference.PreferenceDataset([], tokenizer=tokenizer, render=prompt.render, max_prompt_len=13)


# ---------- grain pipeline ----------


def origins(batch):
    return [e.origin for e in batch]


def test_epochs_are_reshuffled(tokenizer):
    ds = preference.PreferenceDataset(letter_pairs(12), tokenizer=tokenizer, render=prompt.render, max_prompt_len=64)
    it = iter(preference.preference_batches(ds, batch_size=4, seed=3, process_index=0, process_count=1))
    epochs = [sum((origins(next(it)) for _ in range(3)), []) for _ in range(3)]
    everything = sorted(f"item {i}" for i in range(12))
    assert all(sorted(epoch) == everything for epoch in epochs)  # each epoch sees every item once
    assert len({tuple(epoch) for epoch in epochs}) == 3  # in a new order each time
    assert epochs[0] != everything  # and shuffled to begin with


def test_process_shards_partition_the_global_batch(tokenizer):
    ds = preference.PreferenceDataset(
        letter_pairs(10), tokenizer=tokenizer, render=prompt.render, max_prompt_len=64, orders="both"
    )
    whole = iter(preference.preference_batches(ds, batch_size=8, seed=0, process_index=0, process_count=1))
    shards = [
        iter(preference.preference_batches(ds, batch_size=8, seed=0, process_index=p, process_count=2))
        for p in range(2)
    ]
    for _ in range(5):  # across an epoch boundary (10 pairs, 4 per step)
        parts = [next(s) for s in shards]
        assert all(len(p) == 4 for p in parts)
        # in order: process 0's chunk then process 1's is the one-process batch
        assert [(e.origin, e.label) for e in parts[0] + parts[1]] == [(e.origin, e.label) for e in next(whole)]
    for bad in (7, 6):  # 7: not per process; 6: 3 prompts per process is not whole pairs
        with pytest.raises(UserError, match=f"batch_size={bad} must split evenly into 2 process"):
            preference.preference_batches(ds, batch_size=bad, seed=0, process_index=0, process_count=2)


def test_iterator_state_round_trip(tokenizer):
    ds = preference.PreferenceDataset(letter_pairs(9), tokenizer=tokenizer, render=prompt.render, max_prompt_len=64)
    stream = preference.preference_batches(ds, batch_size=2, seed=5, process_index=0, process_count=1)
    it = iter(stream)
    for _ in range(7):  # into the second epoch
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # survives being written into a checkpoint
    expected = [origins(next(it)) for _ in range(6)]
    resumed = iter(preference.preference_batches(ds, batch_size=2, seed=5, process_index=0, process_count=1))
    resumed.set_state(state)
    assert [origins(next(resumed)) for _ in range(6)] == expected
    fresh = iter(stream)
    assert origins(next(fresh)) != expected[0] or origins(next(fresh)) != expected[1]
