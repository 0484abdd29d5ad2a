"""The paged KV cache's host bookkeeping (`rrm_jax.pages`) against a reference written here: a fake device
memory [page, offset] that the test writes through the pool's page table exactly as a kernel would, and a
dict of the tokens each row should hold. Reading every row back through the table must give its own
tokens (no page aliased, no shared page overwritten), and page counts must match what the rows hold."""

import math

import numpy as np
import pytest

from rrm_jax import pages
from rrm_jax.errors import UserError
from rrm_jax.model.config import preset
from rrm_jax.pages import NULL_PAGE, PagePool


class Reference:
    """The pool beside a fake device and the tokens each live row should hold."""

    def __init__(self, pool: PagePool):
        self.pool = pool
        self.memory = np.empty((pool.num_pages, pool.page_size), object)
        self.tokens: dict[int, list] = {}  # row -> the labels of the tokens it holds, in position order
        self.prompt_len: dict[int, int] = {}
        self.group: dict[int, int] = {}
        self.order: list[int] = []  # live rows, oldest first
        self.admissions = 0
        self.admitted_rows = 0
        self.preempted: list[int] = []

    def admit(self, slots, n, max_len=None):
        before = self.pool.pages_in_use
        admission = self.pool.admit(slots, n, max_len)
        P = self.pool.page_size
        # A prompt's pages are counted once, its partly filled last page once per sample.
        assert self.pool.pages_in_use - before == n // P + len(slots) * (n % P > 0)
        assert len(admission.prefill_pages) == math.ceil(n / P)
        prompt = [("prompt", self.admissions, t) for t in range(n)]
        for t, label in enumerate(prompt):  # the prefill writes the prompt once
            self.memory[admission.prefill_pages[t // P], t % P] = label
        assert len(admission.copy_sources) == len(admission.copy_targets) == (len(slots) - 1) * (n % P > 0)
        for src, dst in zip(admission.copy_sources, admission.copy_targets):
            self.memory[dst] = self.memory[src]
        for s in slots:
            self.tokens[s], self.prompt_len[s], self.group[s] = list(prompt), n, self.admissions
            self.order.append(s)
        self.admissions += 1
        self.admitted_rows += len(slots)

    def decode(self, rows, new_lengths):
        """Write each row's new tokens through the table, and an idle row's masked write into NULL_PAGE."""
        P = self.pool.page_size
        for row, n in zip(rows, new_lengths):
            for t in range(len(self.tokens[row]), n):
                label = ("decode", row, self.group[row], t)
                self.memory[self.pool.page_table[row, t // P], t % P] = label
                self.tokens[row].append(label)
        self.memory[NULL_PAGE] = "garbage"

    def grow(self, rows, new_lengths):
        youngest_first = self.order[::-1]
        victims = self.pool.grow(rows, new_lengths)
        assert victims == youngest_first[: len(victims)]  # the most recently admitted rows, youngest first
        for v in victims:
            self.forget(v)
        self.preempted += victims
        kept = [(r, n) for r, n in zip(rows, new_lengths) if r not in victims]
        self.decode([r for r, _ in kept], [n for _, n in kept])

    def release(self, row):
        others = {int(p) for r in self.tokens if r != row for p in self.row_pages(r)}
        mine = set(self.row_pages(row).tolist())
        freed = self.pool.release(row)
        assert sorted(freed.tolist()) == sorted(mine - others)  # exactly the pages no other row holds
        self.forget(row)

    def forget(self, row):
        del self.tokens[row], self.prompt_len[row], self.group[row]
        self.order.remove(row)

    def row_pages(self, row):
        return self.pool.page_table[row, : math.ceil(len(self.tokens[row]) / self.pool.page_size)]

    def expected_pages_in_use(self):
        P = self.pool.page_size
        shared = {self.group[r]: self.prompt_len[r] // P for r in self.tokens}
        own = sum(math.ceil(len(t) / P) - self.prompt_len[r] // P for r, t in self.tokens.items())
        return sum(shared.values()) + own

    def verify(self):
        self.pool.check()
        P = self.pool.page_size
        for row, expected in self.tokens.items():
            read = [self.memory[self.pool.page_table[row, t // P], t % P] for t in range(len(expected))]
            assert read == expected, f"row {row} reads other tokens than it wrote"
        assert self.pool.pages_in_use == self.expected_pages_in_use()
        assert list(self.pool.live_rows()) == self.order
        idle = [r for r in range(self.pool.rows) if r not in self.tokens]
        assert np.all(self.pool.page_table[idle] == NULL_PAGE)
        assert self.pool.preemptions == len(self.preempted)
        assert self.pool.rows_admitted == self.admitted_rows

    def release_all(self):
        for row in list(self.order):
            self.release(row)
        self.verify()
        assert self.pool.pages_in_use == 0 and self.pool.free_pages == self.pool.usable_pages
        assert self.pool.reserved_pages == 0


def run_random(seed: int, policy: str, steps: int = 600):
    """Random admissions, growth in chunks and releases under a pool too small for every row at once."""
    rng = np.random.default_rng(seed)
    P, width, chunk = 4, 8, 5  # rows of at most 32 tokens, growing by up to 5 tokens a call
    pool = PagePool(num_pages=22, page_size=P, max_pages_per_row=width, rows=8)
    ref = Reference(pool)
    limit: dict[int, int] = {}  # row -> the length it finishes at
    peak = shortfalls = 0
    for _ in range(steps):
        op = rng.choice(["admit", "grow", "grow", "release"])
        idle = [r for r in range(pool.rows) if r not in ref.tokens]
        if op == "admit" and idle:
            n, k = int(rng.integers(1, 3 * P + 3)), int(rng.integers(1, min(3, len(idle)) + 1))
            max_len = int(rng.integers(n, width * P + 1))
            reserve = max_len if policy == "reserve" else None
            if pool.can_admit(n, k, reserve):
                slots = [int(s) for s in rng.choice(idle, k, replace=False)]
                ref.admit(slots, n, reserve)
                limit.update(dict.fromkeys(slots, max_len))
            else:
                with pytest.raises(RuntimeError):
                    pool.admit(idle[:k], n, reserve)
        elif op == "grow" and ref.order:
            rows = [int(r) for r in rng.permutation(ref.order)]
            lengths = [min(len(ref.tokens[r]) + int(rng.integers(1, chunk + 1)), limit[r]) for r in rows]
            if policy == "recompute":
                ref.grow(rows, lengths)
            else:
                assert pool.ensure(rows, lengths) == []  # a reserved row never runs short
                ref.decode(rows, lengths)
            for r in [r for r in rows if r in ref.tokens and len(ref.tokens[r]) == limit[r]]:
                ref.release(r)  # finished at its limit
        elif op == "release" and ref.order:
            ref.release(int(rng.choice(ref.order)))
        ref.verify()
        peak = max(peak, pool.pages_in_use)
        shortfalls += policy == "reserve" and pool.pages_in_use + pool.reserved_pages > pool.usable_pages
    assert shortfalls == 0
    assert peak <= pool.peak_pages_in_use <= pool.usable_pages
    ref.release_all()
    return pool


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_growth_with_preemption_keeps_every_row_intact_and_returns_every_page(seed):
    pool = run_random(seed, "recompute")
    assert pool.preemptions > 0  # the pool was small enough to force it
    assert pool.peak_pages_in_use == pool.usable_pages


@pytest.mark.parametrize("seed", [0, 1])
def test_random_reservation_never_runs_short_and_never_preempts(seed):
    pool = run_random(seed, "reserve")
    assert pool.preemptions == 0 and pool.rows_admitted > 0


def test_samples_share_their_prompt_pages():
    P = 16
    pool = PagePool(num_pages=40, page_size=P, max_pages_per_row=8, rows=8)
    ref = Reference(pool)
    ref.admit([5, 1, 6, 2], 2 * P + 3)  # a prompt longer than one page: 2 full pages + a partial one
    ref.verify()
    assert pool.pages_in_use == 2 + 4
    table = pool.page_table
    assert np.all(table[[1, 2, 6], :2] == table[5, :2])  # the full pages are the same physical pages
    assert len({int(table[r, 2]) for r in (5, 1, 6, 2)}) == 4  # each row its own last page
    ref.decode([5, 1, 6, 2], [2 * P + 5] * 4)  # the samples diverge in their own last pages
    ref.verify()
    ref.release(5)  # a sample finishing returns only its own page
    ref.release(1)
    ref.release(6)
    assert pool.pages_in_use == 3
    ref.release(2)  # the last sample returns the shared pages too
    ref.release_all()


@pytest.mark.parametrize("n", [16, 32])
def test_a_prompt_of_whole_pages_is_all_shared_and_the_first_token_takes_a_fresh_page(n):
    P = 16
    pool = PagePool(num_pages=20, page_size=P, max_pages_per_row=4, rows=4)
    ref = Reference(pool)
    ref.admit([0, 1, 2], n)  # n = P is a prompt of exactly one page
    assert pool.pages_in_use == n // P
    ref.verify()
    assert pool.ensure([0, 1, 2], [n] * 3) == [] and pool.pages_in_use == n // P  # nothing to add yet
    ref.grow([0, 1, 2], [n + 1] * 3)
    assert pool.pages_in_use == n // P + 3
    assert len({int(pool.page_table[r, n // P]) for r in range(3)}) == 3
    ref.verify()
    ref.grow([0, 1, 2], [n + P] * 3)  # ending exactly on the next boundary: no page more
    assert pool.pages_in_use == n // P + 3
    ref.grow([0], [n + P + 1])
    assert pool.pages_in_use == n // P + 4
    ref.verify()
    ref.release_all()


def test_more_samples_than_free_pages():
    P = 8
    pool = PagePool(num_pages=6, page_size=P, max_pages_per_row=4, rows=16)  # 5 usable pages
    ref = Reference(pool)
    assert not pool.can_admit(P + 1, 5)  # 1 shared + 5 partial pages
    with pytest.raises(RuntimeError):
        pool.admit(range(5), P + 1)
    ref.verify()  # refused: nothing changed
    assert pool.pages_in_use == 0
    assert pool.can_admit(P, 12)  # a whole-page prompt: 12 samples on one shared page
    ref.admit(list(range(12)), P)
    assert pool.pages_in_use == 1
    ref.verify()
    ref.release_all()
    assert pool.can_admit(P + 1, 4)
    ref.admit(list(range(4)), P + 1)
    assert pool.free_pages == 0
    ref.verify()
    ref.release_all()


def test_a_pool_too_small_for_a_rows_next_page_reports_it_and_changes_nothing():
    P = 4
    pool = PagePool(num_pages=5, page_size=P, max_pages_per_row=4, rows=2)  # 4 usable pages
    ref = Reference(pool)
    ref.admit([0], 2 * P)
    ref.admit([1], P + 1)
    table, free = pool.page_table.copy(), pool.free_pages
    assert free == 0
    assert pool.ensure([1, 0], [P + 2, 2 * P + 1]) == [0]  # row 1 fits its page; row 0 needs a new one
    assert np.array_equal(pool.page_table, table) and pool.free_pages == free
    ref.decode([1], [P + 2])
    ref.verify()
    ref.release(1)
    assert pool.ensure([0], [2 * P + 1]) == []
    ref.decode([0], [2 * P + 1])
    ref.verify()
    ref.release_all()


def test_growth_serves_the_oldest_rows_first():
    P = 4
    pool = PagePool(num_pages=6, page_size=P, max_pages_per_row=4, rows=3)  # 5 usable pages
    ref = Reference(pool)
    ref.admit([2], P)
    ref.admit([0], P)
    ref.admit([1], P)
    # Two free pages: row 2 (the oldest) wants three, row 0 one, row 1 one. Once row 2 is short, no
    # younger row takes a page, so preempting the youngest frees pages for the oldest.
    assert pool.ensure([1, 0, 2], [P + 1, P + 1, 4 * P]) == [2, 0, 1]
    ref.verify()
    assert pool.ensure([1, 0, 2], [P + 1, P + 1, 2 * P]) == [1]
    ref.decode([0, 2], [P + 1, 2 * P])
    ref.verify()
    ref.release_all()


def test_preemption_releases_exactly_the_youngest_rows_pages():
    P = 4
    pool = PagePool(num_pages=9, page_size=P, max_pages_per_row=4, rows=6)  # 8 usable pages
    ref = Reference(pool)
    ref.admit([3, 4], 2 * P + 1)  # 2 shared + 2 partial
    ref.admit([0, 1], P + 2)  # 1 shared + 2 partial
    ref.admit([5], 1)  # 1: the youngest
    assert pool.free_pages == 0
    # Two pages wanted, none free: row 5 goes first (one page), then row 1 (its own page; the page it
    # shares with row 0 stays).
    ref.grow([3, 4], [3 * P + 1, 3 * P + 1])
    assert ref.preempted == [5, 1]
    ref.verify()
    assert pool.page_table[0, 0] != NULL_PAGE  # row 0 still holds the prompt page it shared with row 1
    victim_pages = set(ref.row_pages(0).tolist())
    free_before = pool.free_pages
    assert pool.preempt_youngest(among=[3, 0]) == 0  # the youngest of these
    ref.forget(0)
    ref.preempted.append(0)
    assert pool.free_pages - free_before == len(victim_pages)  # its shared page went with its last sample
    ref.verify()
    ref.release_all()
    assert pool.preempt_youngest() is None


def test_grow_refuses_a_pool_that_cannot_hold_one_row():
    pool = PagePool(num_pages=3, page_size=4, max_pages_per_row=4, rows=2)
    ref = Reference(pool)
    ref.admit([0], 8)
    with pytest.raises(UserError, match="cannot hold one row"):
        pool.grow([0], [9])
    ref.verify()
    assert pool.pages_needed(8, 1, max_len=9) > pool.usable_pages  # what the engine checks up front


def test_reservation_holds_back_the_pages_a_row_will_need():
    P = 4
    pool = PagePool(num_pages=9, page_size=P, max_pages_per_row=4, rows=4)  # 8 usable pages
    ref = Reference(pool)
    ref.admit([0, 1], 3, max_len=3 * P)  # 1 page each now, 2 more each set aside
    assert pool.pages_in_use == 2 and pool.reserved_pages == 4 and pool.free_pages == 2
    assert not pool.can_admit(3, 1, max_len=3 * P + 1)  # 4 pages: physically free, but promised
    assert pool.can_admit(3, 2) and not pool.can_admit(3, 2, headroom=1)
    ref.admit([2, 3], 3)  # unreserved rows take the last two free pages
    assert pool.ensure([3], [P + 1]) == [3]  # ... and cannot take a reserved one
    ref.grow([1, 0], [3 * P, 2 * P])  # the reserved rows grow regardless
    assert pool.reserved_pages == 1
    ref.verify()
    ref.release(0)  # its unused reservation comes back
    assert pool.reserved_pages == 0 and pool.free_pages == 3  # its 2 pages and 1 set aside
    ref.release_all()


def test_check_catches_a_corrupted_table():
    pool = PagePool(num_pages=8, page_size=4, max_pages_per_row=4, rows=3)
    pool.admit([0], 6)
    pool.admit([1], 6)
    pool.check()
    pool.page_table[1, 1] = pool.page_table[0, 1]  # two unrelated rows on one page
    with pytest.raises(AssertionError, match="reference counts|two rows"):
        pool.check()


def test_lengths_past_the_table_are_refused():
    pool = PagePool(num_pages=8, page_size=4, max_pages_per_row=2, rows=2)
    with pytest.raises(ValueError, match="does not fit"):
        pool.can_admit(9, 1)
    pool.admit([0], 8)
    with pytest.raises(ValueError, match="does not fit"):
        pool.ensure([0], [9])
    pool.check()


def test_pool_size_from_a_byte_budget():
    # The figures: 28 KB a token for the 1.5B and 256 KB for the 32B in bfloat16.
    small = preset("r1-distill-qwen-1.5b").replace(dtype="bfloat16")
    large = preset("r1-distill-qwen-32b").replace(dtype="bfloat16")
    assert small.kv_bytes_per_token == 2 * 28 * 2 * 128 * 2 == 28_672
    assert large.kv_bytes_per_token == 2 * 64 * 8 * 128 * 2 == 262_144
    assert large.replace(dtype="float32").kv_bytes_per_token == 2 * large.kv_bytes_per_token
    budget = 10 * 2**30
    assert pages.pages_in_budget(budget, 64, small.kv_bytes_per_token) == budget // (64 * 28_672) == 5851
    assert pages.pages_in_budget(64 * 28_672 - 1, 64, small.kv_bytes_per_token) == 0


def test_keep_rows_renumbers_table_rows_and_keeps_every_live_row():
    """The engine's compaction: kept rows move with their pages, admission order and sharing."""
    pool = PagePool(num_pages=20, page_size=4, max_pages_per_row=4, rows=8)
    ref = Reference(pool)
    ref.admit([5, 2], 6)  # one shared page, a partial one each
    ref.admit([7], 3)
    before = pool.page_table.copy()
    with pytest.raises(ValueError, match="live rows \\[7\\]"):
        pool.keep_rows([5, 2, 0, 1])
    keep = [7, 2, 5, 0]
    pool.keep_rows(keep)
    assert pool.rows == 4 and np.array_equal(pool.page_table, before[keep])
    assert pool.live_rows().tolist() == [2, 1, 0]  # admission order: old rows 5, 2, then 7
    pool.check()
    ref.pool, ref.tokens = pool, {keep.index(r): t for r, t in ref.tokens.items()}
    ref.prompt_len = {keep.index(r): n for r, n in ref.prompt_len.items()}
    ref.group = {keep.index(r): g for r, g in ref.group.items()}
    ref.order = [2, 1, 0]
    ref.grow([0, 1, 2], [9, 9, 9])  # the renumbered rows grow in their own pages
    ref.verify()
    ref.release_all()


def test_sharded_pool_keeps_each_shards_rows_in_its_own_pages():
    """Two shards of 6 pages (global ids 0-5 and 6-11, NULL_PAGE 0 and 6) and 3 rows each (0-2, 3-5)."""
    kv = pages.ShardedPagePool(shards=2, pages_per_shard=6, page_size=4, max_pages_per_row=4, rows_per_shard=3)
    admission = kv.admit([3, 4], 6)  # shard 1: a shared page and a partial one each
    held = np.concatenate([admission.prefill_pages, admission.copy_targets])
    assert len(held) == 3 and np.all((held > 6) & (held < 12))
    table = kv.page_table()
    assert table.shape == (6, 4) and np.all(table[:3] == 0) and np.all(table[5] == 6)  # each shard's null page
    assert table[3, 0] == table[4, 0] and table[3, 1] != table[4, 1]
    kv.admit([0], 5)
    with pytest.raises(ValueError):
        kv.admit([2, 5], 4)  # a prompt's rows on two shards
    assert kv.grow([3, 4, 0], [12, 12, 16]) == []  # shard 1: 1 + 2 + 2 pages; shard 0: 4
    assert kv.pages_in_use == 9 and kv.peak_pages_in_use == 9
    assert kv.grow([3, 4, 0], [16, 16, 16]) == [4]  # shard 1 needs 7 of its 5: its youngest goes
    assert kv.preemptions == 1 and kv.held(3) == 4 and kv.held(0) == 4
    assert kv.pages_in_use == 8 and kv.peak_pages_in_use == 9  # row 4's own pages freed, one went to row 3
    table = kv.page_table()
    with pytest.raises(ValueError):
        kv.keep_rows([3, 0])  # shard 1's row first
    kv.keep_rows([0, 3])
    assert kv.rows_per_shard == 1 and np.array_equal(kv.page_table(), table[[0, 3]])
    kv.check()
    kv.release(0)
    kv.release(1)
    assert kv.pages_in_use == 0
    kv.check()
