"""Host-side bookkeeping of a paged KV cache: a pool of fixed-size pages, a page table per row, and the
admission and growth rules that decide which row holds which page. Plain numpy and Python; the device
side (the cache array [.., num_pages, page_size, ..], the kernels reading it through the table) lives in
the engine, which uploads `PagePool.page_table` and applies what `PagePool.admit` returns.

Layout. Row r's token at position t lives in physical page `page_table[r, t // page_size]` at offset
`t % page_size`. Page 0 (NULL_PAGE) is never handed out: every unused table entry points at it, so a
kernel that reads a fixed number of pages per row, or the masked tail of a block, reads real memory
(never an out-of-range index), and an idle or finished row's masked write lands there. Its contents are
garbage that no row's length ever covers, so kernels must mask it with a select, not by multiplying
with zero (garbage may hold inf or NaN).

Sharing. A prompt of n tokens admitted as num_samples rows writes its KV once: its n // page_size full
pages are shared by all the rows (reference counted) and only its last, partly filled page is per row:
the prefill writes it in the first row's page and the device copies that page to the others'
(`Admission.copy_sources`, `copy_targets`). Decode writes only positions >= n, so it never touches a
shared page; when n is a whole number of pages every prompt page is shared and each row's first decode
token takes a fresh page.

Running out. Pages are taken as rows grow (`ensure`, before each chunk of decode steps, for the length
each row may reach by the end of the chunks in flight) and returned when a row finishes (`release`).
Two policies keep a request from being lost or truncated when the pool runs dry:

  recompute  admit a prompt when its prompt pages fit (`can_admit(n, k)`, optionally with `headroom`
             pages left free for the running rows' growth); when `ensure` finds no page for a row,
             preempt the youngest row (`grow` does both) and queue its request again;
  reserve    admit a prompt only when every row's worst case fits (`can_admit(n, k, max_len=n + limit)`);
             its future pages are set aside, so `ensure` never fails and nothing is preempted.

Recommended for the engine: recompute, as vLLM does. Reserving a row's worst case holds back the pages
of a trace's cap, so it admits about as many rows as the contiguous cache (RRM traces hold about a fifth
of the cap on average; only prompt sharing and page rounding gain), while growth holds pages for the
tokens rows actually have. The youngest row has made the least progress, so preempting it wastes the
least work, and a headroom at admission keeps preemption rare. Results stay identical whatever the pool
size if a preempted row restarts from its prompt and regenerates its tokens with the same decode
program: its random stream depends only on (seed, prompt, sample). (Prefilling its generated tokens
instead would be cheaper but computes their KV with the prefill program, whose rounding differs.) The
pool must hold one row's worst case for progress: check `pages_needed(n, k, max_len)` <= `usable_pages`
before generating; `grow` raises if a row alone cannot grow.

Meshes and compaction. `ShardedPagePool` keeps one pool per batch shard, as `paged_attention` shards the
device pool (a shard's rows hold only its pages); `PagePool.keep_rows` renumbers the rows when the
engine compacts its running batch (table rows move, pages stay). The engine (`rrm_jax.engine`) runs the
recompute policy, admitting each prefill pack's requests through `Placement`.

Contract with the device. A row's pages may be rewritten by the next row that takes them, so release or
preempt a row only once no dispatched chunk can still write its KV (read the chunk in flight first).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from rrm_jax.errors import UserError

NULL_PAGE = 0  # never allocated: the target of every unused page-table entry
# Positions a page, by default: both paged kernels take 64 (`rrm_jax.model.paged_attention`: the GPU one
# wants a power of two <= its 128-position blocks, the TPU one whole bf16 tiles and few enough pages a row
# for its page table to fit SMEM); a row wastes under a page on average.
PAGE_SIZE = 64


def pool_floor(positions: int, page_size: int) -> int:
    """The fewest pages a pool (one batch shard's) may have: one row of `positions` positions, plus the null
    page. A smaller pool could never run a trace that long, so it is refused rather than left to stall."""
    return -(-positions // page_size) + 1


def pages_in_budget(budget_bytes: int, page_size: int, kv_bytes_per_token: int) -> int:
    """Pages (NULL_PAGE included: it takes device memory too) of `page_size` tokens that fit in
    budget_bytes, e.g. `pages_in_budget(budget, 64, config.kv_bytes_per_token)` for one device holding
    every layer and KV head (divide kv_bytes_per_token by what tensor parallelism splits)."""
    return budget_bytes // (page_size * kv_bytes_per_token)


@dataclasses.dataclass(frozen=True)
class Admission:
    """What the device must do to admit a prompt: write its KV (position t into
    `prefill_pages[t // page_size]`), then copy page `copy_sources[i]` onto page `copy_targets[i]` for
    every i (the partly filled last page, to the other samples' rows)."""

    prefill_pages: np.ndarray  # [ceil(n / page_size)] int32: the first row's pages, in position order
    copy_sources: np.ndarray  # [m] int32
    copy_targets: np.ndarray  # [m] int32


class PagePool:
    """Free list, reference counts and page table of `num_pages` pages of `page_size` tokens for `rows`
    rows of at most `max_pages_per_row` pages. Rows are the engine's slots; a live row is one admitted
    and not yet released."""

    def __init__(self, num_pages: int, page_size: int, max_pages_per_row: int, rows: int):
        if num_pages < 2 or page_size < 1 or max_pages_per_row < 1 or rows < 1:
            raise ValueError(
                f"a page pool needs num_pages >= 2 (one is NULL_PAGE), page_size, max_pages_per_row and rows >= 1; "
                f"got {num_pages}, {page_size}, {max_pages_per_row}, {rows}"
            )
        self.num_pages, self.page_size, self.max_pages_per_row, self.rows = (
            num_pages,
            page_size,
            max_pages_per_row,
            rows,
        )
        self.page_table = np.full((rows, max_pages_per_row), NULL_PAGE, np.int32)
        self._refcount = np.zeros(num_pages, np.int32)
        self._free = list(range(num_pages - 1, NULL_PAGE, -1))  # a stack: the lowest ids go first
        self._held = np.zeros(rows, np.int32)  # table entries in use per row
        self._shared = np.zeros(rows, np.int32)  # leading entries shared with the row's prompt group
        self._reserved = np.zeros(rows, np.int32)  # future pages set aside for the row (the reserve policy)
        self._serial = np.full(rows, -1, np.int64)  # admission order (-1: not live); the youngest is the largest
        self._group = np.full(rows, -1, np.int64)  # which admission (prompt) the row belongs to
        self._next_serial = 0
        self._next_group = 0
        self.peak_pages_in_use = 0
        self.preemptions = 0
        self.rows_admitted = 0

    # ---- sizes -------------------------------------------------------------------------------------

    @property
    def usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def pages_in_use(self) -> int:
        return self.usable_pages - len(self._free)

    @property
    def reserved_pages(self) -> int:
        return int(self._reserved.sum())

    @property
    def free_pages(self) -> int:
        """Pages an admission or an unreserved growth may take: free ones not set aside for a row."""
        return len(self._free) - self.reserved_pages

    def held(self, row: int) -> int:
        """Pages row `row` holds (its table entries in use)."""
        return int(self._held[row])

    def pages_for(self, tokens: int) -> int:
        """Pages a row of `tokens` positions holds."""
        return -(-tokens // self.page_size)

    def pages_needed(self, prompt_len: int, num_samples: int, max_len: int | None = None) -> int:
        """Pages admitting a prompt takes: its full pages once, its partly filled page once per sample, and
        with max_len (reserve policy) every sample's pages up to max_len tokens."""
        full, rest = divmod(prompt_len, self.page_size)
        need = full + num_samples * (rest > 0)
        if max_len is not None:
            need += num_samples * (self.pages_for(max_len) - self.pages_for(prompt_len))
        return need

    def live_rows(self) -> np.ndarray:
        """The live rows, oldest first."""
        live = np.flatnonzero(self._serial >= 0)
        return live[np.argsort(self._serial[live], kind="stable")]

    # ---- admission ---------------------------------------------------------------------------------

    def can_admit(self, prompt_len: int, num_samples: int, max_len: int | None = None, headroom: int = 0) -> bool:
        """Whether `admit` would succeed now, leaving at least `headroom` pages free."""
        self._check_lengths(prompt_len, max_len)
        return self.pages_needed(prompt_len, num_samples, max_len) + headroom <= self.free_pages

    def admit(self, slots: Sequence[int], prompt_len: int, max_len: int | None = None) -> Admission:
        """Give the rows `slots` (one per sample) the pages of a prompt of prompt_len tokens, its full pages
        shared; with max_len, set aside each row's pages up to max_len tokens. Raises RuntimeError when
        the pool cannot hold it (ask `can_admit` first); nothing changes then."""
        slots = [int(s) for s in slots]
        if not slots or len(set(slots)) != len(slots) or min(slots) < 0 or max(slots) >= self.rows:
            raise ValueError(f"slots must be distinct rows in [0, {self.rows}); got {slots}")
        if busy := [s for s in slots if self._serial[s] >= 0]:
            raise ValueError(f"rows {busy} are live; release them first")
        if max_len is not None and max_len < prompt_len:
            raise ValueError(f"max_len={max_len} is shorter than the prompt ({prompt_len} tokens)")
        if not self.can_admit(prompt_len, len(slots), max_len):
            need = self.pages_needed(prompt_len, len(slots), max_len)
            raise RuntimeError(f"admitting needs {need} pages, {self.free_pages} are free")
        full, rest = divmod(prompt_len, self.page_size)
        shared = self._take(full)
        self._refcount[shared] = len(slots)
        partial = self._take(len(slots) if rest else 0)
        self._refcount[partial] = 1
        future = self.pages_for(max_len) - self.pages_for(prompt_len) if max_len is not None else 0
        for i, slot in enumerate(slots):
            self.page_table[slot, :full] = shared
            if rest:
                self.page_table[slot, full] = partial[i]
            self._held[slot] = full + (rest > 0)
            self._shared[slot] = full
            self._reserved[slot] = future
            self._serial[slot] = self._next_serial
            self._group[slot] = self._next_group
            self._next_serial += 1
        self._next_group += 1
        self.rows_admitted += len(slots)
        self._note_peak()
        return Admission(
            prefill_pages=self.page_table[slots[0], : self._held[slots[0]]].copy(),
            copy_sources=np.full(max(0, len(partial) - 1), partial[0] if partial else NULL_PAGE, np.int32),
            copy_targets=np.asarray(partial[1:], np.int32),
        )

    # ---- growth and release ------------------------------------------------------------------------

    def ensure(self, rows: Sequence[int], new_lengths: Sequence[int]) -> list[int]:
        """Give each row the pages for new_lengths[i] positions (the length it may reach by the end of the
        chunks about to run). Rows are served oldest first; a row's own reserved pages always serve it, and
        once a row cannot get an unreserved page no younger row takes one (so preempting the youngest rows
        frees pages for the oldest). Returns the rows left short (oldest first), which got no page; their
        tables are unchanged."""
        rows = [int(r) for r in rows]
        if len(rows) != len(new_lengths):
            raise ValueError(f"{len(rows)} rows but {len(new_lengths)} lengths")
        want = dict(zip(rows, (int(n) for n in new_lengths)))
        for row, n in want.items():
            if self._serial[row] < 0:
                raise ValueError(f"row {row} is not live")
            self._check_lengths(n)
        short: list[int] = []
        for row in sorted(want, key=lambda r: self._serial[r]):
            need = self.pages_for(want[row]) - int(self._held[row])
            if need <= 0:
                continue
            own = min(need, int(self._reserved[row]))
            if need - own > 0 and (short or need - own > self.free_pages):
                short.append(row)
                continue
            self._reserved[row] -= own
            held = int(self._held[row])
            pages = self._take(need)
            self._refcount[pages] = 1
            self.page_table[row, held : held + need] = pages
            self._held[row] = held + need
        self._note_peak()
        return short

    def release(self, row: int) -> np.ndarray:
        """Return a live row's pages (a shared page once its last row lets go) and its reservation; the
        row's table entries point at NULL_PAGE again. Returns the pages freed."""
        if self._serial[row] < 0:
            raise ValueError(f"row {row} is not live")
        pages = self.page_table[row, : self._held[row]].copy()
        self._refcount[pages] -= 1
        freed = pages[self._refcount[pages] == 0]
        self._free.extend(freed.tolist()[::-1])
        self.page_table[row] = NULL_PAGE
        self._held[row] = self._shared[row] = self._reserved[row] = 0
        self._serial[row] = self._group[row] = -1
        return freed

    def preempt_youngest(self, among: Sequence[int] | None = None) -> int | None:
        """Release the most recently admitted live row (of `among`, when given) so its request can be
        recomputed later; returns it, or None when there is none."""
        live = self.live_rows()
        if among is not None:
            live = live[np.isin(live, np.asarray(among, np.int64))]
        if live.size == 0:
            return None
        victim = int(live[-1])
        self.release(victim)
        self.preemptions += 1
        return victim

    def grow(self, rows: Sequence[int], new_lengths: Sequence[int]) -> list[int]:
        """`ensure`, preempting the youngest live row while a row is left short (the recompute policy).
        Returns the preempted rows, in the order preempted; the other rows of `rows` have their pages.
        Raises UserError when a row alone cannot grow: the pool is too small for one request."""
        want = dict(zip((int(r) for r in rows), (int(n) for n in new_lengths)))
        preempted: list[int] = []
        while short := self.ensure(list(want), list(want.values())):
            if len(self.live_rows()) == 1:
                row = short[0]
                raise UserError(
                    f"the KV page pool ({self.usable_pages} pages of {self.page_size} tokens) cannot hold one "
                    f"row of {want[row]} tokens; give the cache more memory or lower max_new_tokens"
                )
            victim = self.preempt_youngest()
            preempted.append(victim)
            want.pop(victim, None)
        return preempted

    # ---- compaction --------------------------------------------------------------------------------

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Keep only the rows `rows`, renumbered in that order (row i is old row rows[i]): the engine's
        compaction of its running batch, which moves per-row state and table rows, never pages. Every live
        row must be kept."""
        rows = np.asarray(rows, np.int64)
        if len(set(rows.tolist())) != len(rows) or rows.size == 0 or rows.min() < 0 or rows.max() >= self.rows:
            raise ValueError(f"rows must be distinct rows in [0, {self.rows}); got {rows.tolist()}")
        if lost := sorted(set(self.live_rows().tolist()) - set(rows.tolist())):
            raise ValueError(f"live rows {lost} would be dropped; release them first")
        self.rows = len(rows)
        self.page_table = self.page_table[rows]
        for name in ("_held", "_shared", "_reserved", "_serial", "_group"):
            setattr(self, name, getattr(self, name)[rows])

    # ---- invariants --------------------------------------------------------------------------------

    def check(self) -> None:
        """Raise AssertionError unless: every usable page is free (once, reference count 0) or referenced;
        reference counts equal the table entries naming each page; unused entries name NULL_PAGE; a page
        in several rows is a full prompt page of one admission, at the same place in each; reservations
        fit in the free pages."""
        free = np.asarray(self._free, np.int64)
        _expect(len(set(self._free)) == len(self._free), "a page is on the free list twice")
        _expect(NULL_PAGE not in self._free and self._refcount[NULL_PAGE] == 0, "NULL_PAGE was handed out")
        _expect(bool(np.all(self._refcount[free] == 0)), "a free page is referenced")
        counts = np.zeros(self.num_pages, np.int64)
        owner: dict[int, tuple[int, int, int]] = {}  # page -> (group, table index, shared entries) of a row naming it
        for row in range(self.rows):
            held = int(self._held[row])
            live = self._serial[row] >= 0
            _expect(live or held == 0, f"row {row} is not live but holds pages")
            _expect(bool(np.all(self.page_table[row, held:] == NULL_PAGE)), f"row {row} names pages past its own")
            pages = self.page_table[row, :held]
            _expect(bool(np.all(pages != NULL_PAGE)), f"row {row} holds NULL_PAGE")
            _expect(len(set(pages.tolist())) == held, f"row {row} holds a page twice")
            np.add.at(counts, pages, 1)
            for index, page in enumerate(pages.tolist()):
                here = (int(self._group[row]), index, int(self._shared[row]))
                first = owner.setdefault(page, here)
                if first is not here:
                    _expect(
                        first == here and index < here[2],
                        f"page {page} is in two rows that are not samples sharing a prompt page",
                    )
        _expect(bool(np.all(counts == self._refcount)), "reference counts differ from the page table")
        _expect(int((counts[1:] == 0).sum()) == len(self._free), "a page is neither free nor referenced")
        _expect(bool(np.all(self._reserved >= 0)) and self.reserved_pages <= len(self._free), "reservations overdrawn")
        _expect(self.pages_in_use <= self.peak_pages_in_use, "peak below pages in use")

    # ---- internals ---------------------------------------------------------------------------------

    def _take(self, count: int) -> list[int]:
        cut = len(self._free) - count
        taken = self._free[cut:][::-1]
        del self._free[cut:]
        return taken

    def _note_peak(self) -> None:
        self.peak_pages_in_use = max(self.peak_pages_in_use, self.pages_in_use)

    def _check_lengths(self, *lengths: int | None) -> None:
        for n in lengths:
            if n is not None and not 1 <= self.pages_for(n) <= self.max_pages_per_row:
                raise ValueError(
                    f"a row of {n} tokens does not fit a page table of {self.max_pages_per_row} pages of "
                    f"{self.page_size} tokens"
                )


def _expect(condition: bool, message: str) -> None:
    if not condition:  # not `assert`: the check must run under python -O too
        raise AssertionError(message)


class ShardedPagePool:
    """One PagePool per batch shard of a mesh, laid out as `paged_attention` shards a pool: shard s owns
    the global pages [s * n, (s + 1) * n) (n = pages_per_shard, the first of them its NULL_PAGE) and the
    rows [s * r, (s + 1) * r) (r = rows_per_shard), and its rows hold only its pages, so every shard
    attends and writes through its own slice. Rows and page ids here are global; without a mesh there is
    one shard, a plain pool. Admissions stay on one shard (a prompt's samples share pages); growth,
    preemption and release act on the row's own shard."""

    def __init__(self, shards: int, pages_per_shard: int, page_size: int, max_pages_per_row: int, rows_per_shard: int):
        self.pools = [PagePool(pages_per_shard, page_size, max_pages_per_row, rows_per_shard) for _ in range(shards)]
        self.pages_per_shard, self.page_size = pages_per_shard, page_size
        self.peak_pages_in_use = 0  # of all shards at once (the pools' own peaks may fall at other times)

    @property
    def rows_per_shard(self) -> int:
        return self.pools[0].rows

    @property
    def num_pages(self) -> int:
        return self.pages_per_shard * len(self.pools)

    @property
    def pages_in_use(self) -> int:
        return sum(p.pages_in_use for p in self.pools)

    @property
    def preemptions(self) -> int:
        return sum(p.preemptions for p in self.pools)

    def shard_of(self, row: int) -> tuple[int, int]:
        """(shard, the row's index in that shard's pool)."""
        return divmod(int(row), self.rows_per_shard)

    def page_table(self) -> np.ndarray:
        """[shards * rows_per_shard, max_pages_per_row] int32 of global page ids (an unused entry names its
        shard's NULL_PAGE)."""
        return np.concatenate([p.page_table + s * self.pages_per_shard for s, p in enumerate(self.pools)])

    def admit(self, rows: Sequence[int], prompt_len: int) -> Admission:
        """PagePool.admit on the rows' shard (all of them on one), with global page ids."""
        (shard,) = {self.shard_of(r)[0] for r in rows}
        a = self.pools[shard].admit([self.shard_of(r)[1] for r in rows], prompt_len)
        self._note_peak()
        base = shard * self.pages_per_shard
        return Admission(a.prefill_pages + base, a.copy_sources + base, a.copy_targets + base)

    def ensure(self, rows: Sequence[int], new_lengths: Sequence[int]) -> list[int]:
        """PagePool.ensure per shard; returns the rows left short."""
        short = [
            self._global(s, r) for s, rs, ns in self._by_shard(rows, new_lengths) for r in self.pools[s].ensure(rs, ns)
        ]
        self._note_peak()
        return short

    def grow(self, rows: Sequence[int], new_lengths: Sequence[int]) -> list[int]:
        """PagePool.grow per shard; returns the preempted rows."""
        preempted = []
        for s, rs, ns in self._by_shard(rows, new_lengths):
            if self.pools[s].ensure(rs, ns):  # short: noted at its fullest, before preempting frees pages
                self._note_peak()
                preempted += [self._global(s, r) for r in self.pools[s].grow(rs, ns)]
        self._note_peak()
        return preempted

    def held(self, row: int) -> int:
        shard, local = self.shard_of(row)
        return self.pools[shard].held(local)

    def release(self, row: int) -> None:
        shard, local = self.shard_of(row)
        self.pools[shard].release(local)

    def keep_rows(self, rows: Sequence[int]) -> None:
        """PagePool.keep_rows per shard: `rows` lists each shard's kept rows in turn, as many for every
        shard (rows[i] must lie on shard i // (len(rows) / shards))."""
        per, rest = divmod(len(rows), len(self.pools))
        if rest:
            raise ValueError(f"{len(rows)} rows do not split over {len(self.pools)} shards")
        where = [self.shard_of(r) for r in rows]  # before any pool shrinks, which renumbers the rows
        if any(shard != i // per for i, (shard, _) in enumerate(where)):
            raise ValueError(f"rows {list(rows)} are not {per} rows of each shard in turn")
        for s, pool in enumerate(self.pools):
            pool.keep_rows([local for _, local in where[s * per : (s + 1) * per]])

    def check(self) -> None:
        for pool in self.pools:
            pool.check()

    def _by_shard(self, rows, new_lengths):
        groups: dict[int, tuple[list[int], list[int]]] = {}
        for row, n in zip(rows, new_lengths, strict=True):
            shard, local = self.shard_of(row)
            groups.setdefault(shard, ([], []))[0].append(local)
            groups[shard][1].append(int(n))
        return [(s, rs, ns) for s, (rs, ns) in sorted(groups.items())]

    def _global(self, shard: int, local: int) -> int:
        return shard * self.rows_per_shard + int(local)

    def _note_peak(self) -> None:
        self.peak_pages_in_use = max(self.peak_pages_in_use, self.pages_in_use)


class Placed(NamedTuple):
    """One request's rows a pack starts on a paged cache."""

    samples: list[int]
    slots: list[int]
    pages: Admission  # global page ids


class Placement:
    """Where a prefill pack's requests start on a paged cache (the recompute policy's admission rule, as
    the engine applies it to each pack): a request's pending samples go to the batch shard that holds the
    most of them (all at once, sharing their prompt pages, unless a shard could never hold them all), if
    its free rows and free pages hold them: their prompt pages plus a margin of the pages every row of the
    shard may still take in the next `ahead` tokens (the chunks in flight), its running rows' (`margin`)
    and the new ones', so an admission never makes the next chunk preempt. A row's margin stops at its
    longest length, so a pool sized for every slot's longest row admits whenever a slot is free (as the
    contiguous cache), and an empty pool always takes a request's first sample. `take` plans one request
    more; `commit` admits the first planned ones and takes their samples off `pending`."""

    def __init__(self, kv: ShardedPagePool, free: list[int], pending: dict, requests, margin: list[int], ahead: int):
        self.kv, self.pending, self.requests, self.ahead = kv, pending, requests, ahead
        shards = range(len(kv.pools))
        self.free_rows = [sorted(slot for slot in free if kv.shard_of(slot)[0] == s) for s in shards]
        self.rows_left = [len(rows) for rows in self.free_rows]
        self.pages_left = [pool.free_pages - m for pool, m in zip(kv.pools, margin)]
        self.plan: list[tuple[int, int, list[int]]] = []  # (request, shard, samples)

    def _need(self, shard: int, request, k: int) -> int:
        """Pages k samples of `request` (its `prompt_ids` and `max_new_tokens`) take on `shard`, with their
        margin."""
        pool, n = self.kv.pools[shard], len(request.prompt_ids)
        growth = pool.pages_for(n + min(self.ahead, request.max_new_tokens)) - pool.pages_for(n)
        return pool.pages_needed(n, k) + k * growth

    def _samples_now(self, shard: int, request: int) -> int:
        """How many of the request's pending samples start on `shard` now: all of them if they fit (so they
        share their prompt pages), else none; but as many as fit if the shard could never hold them all
        at once (more than its rows, or its pages)."""
        req, pool, whole = self.requests[request], self.kv.pools[shard], len(self.pending[request])
        fits = lambda k: k <= self.rows_left[shard] and self._need(shard, req, k) <= self.pages_left[shard]
        if fits(whole):
            return whole
        if whole <= self.kv.rows_per_shard and self._need(shard, req, whole) <= pool.usable_pages:
            return 0
        return next((k for k in range(whole - 1, 0, -1) if fits(k)), 0)

    def take(self, request: int) -> bool:
        samples = self.pending[request]
        k, _, shard = max((self._samples_now(s, request), self.pages_left[s], -s) for s in range(len(self.kv.pools)))
        if k == 0:
            return False
        shard = -shard
        self.rows_left[shard] -= k
        self.pages_left[shard] -= self._need(shard, self.requests[request], k)
        self.plan.append((request, shard, samples[:k]))
        return True

    def commit(self, count: int) -> list[Placed]:
        placed = []
        for request, shard, samples in self.plan[:count]:
            slots = [self.free_rows[shard].pop(0) for _ in samples]
            pages = self.kv.admit(slots, len(self.requests[request].prompt_ids))
            self.pending[request] = self.pending[request][len(samples) :]
            placed.append(Placed(samples, slots, pages))
        return placed
