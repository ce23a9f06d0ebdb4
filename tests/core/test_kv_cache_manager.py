from __future__ import annotations

import hashlib
import itertools

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tokenmill.core import block_hash
from tokenmill.core.block_hash import hash_block_tokens
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.core.kv_group import KVGroupSpec
from tokenmill.request import Request, RequestStatus
from tokenmill.sampling_params import SamplingParams

_ids = itertools.count()


def make_req(tokens: list[int], salt: str | None = None) -> Request:
    return Request(f"r{next(_ids)}", list(tokens), SamplingParams(), cache_salt=salt)


def one_group(num_blocks: int, block_size: int, caching: bool = True) -> KVCacheManager:
    return KVCacheManager([KVGroupSpec(num_blocks)], block_size, caching)


def compute(kv: KVCacheManager, req: Request, num_new: int) -> list[int] | None:
    """Allocate and pretend the runner computed `num_new` more tokens; the block table."""
    tables = kv.allocate_slots(req, num_new)
    if tables is not None:
        req.num_computed_tokens += num_new
        kv.cache_blocks(req, req.num_computed_tokens)
    return None if tables is None else tables[0]


def admit(kv: KVCacheManager, req: Request) -> list[int] | None:
    """Prefix lookup plus allocation of the whole remainder, then compute it."""
    hit_ids, num_hit = kv.get_computed_blocks(req)
    tables = kv.allocate_slots(req, req.num_tokens - num_hit, hit_ids, num_hit)
    if tables is not None:
        req.num_computed_tokens = req.num_tokens
        kv.cache_blocks(req, req.num_computed_tokens)
    return None if tables is None else tables[0]


def hit(kv: KVCacheManager, req: Request) -> tuple[list[int], int]:
    """The one group's prefix hit: (block ids, tokens)."""
    (ids,), num = kv.get_computed_blocks(req)
    return ids, num


def finish(kv: KVCacheManager, req: Request) -> None:
    req.status = RequestStatus.FINISHED_STOPPED
    kv.free(req)


def test_hash_is_chained_stable_and_salted() -> None:
    h0 = hash_block_tokens(None, [1, 2, 3, 4])
    assert h0 == hash_block_tokens(None, [1, 2, 3, 4]) and len(h0) == 32
    assert hash_block_tokens(h0, [5]) != hash_block_tokens(None, [5])
    assert hash_block_tokens(h0, [5]) != hash_block_tokens(hash_block_tokens(None, [9]), [5])
    assert hash_block_tokens(None, [1, 2]) != hash_block_tokens(None, [1, 2], "salt")
    assert hash_block_tokens(None, [1, 2], "a") != hash_block_tokens(None, [1, 2], "b")
    assert hash_block_tokens(None, [1, 2], "") != hash_block_tokens(None, [1, 2])
    assert hash_block_tokens(None, [1, 2]) != hash_block_tokens(None, [2, 1])
    assert hash_block_tokens(None, [256]) != hash_block_tokens(None, [1, 0])


def test_vllm_doc_eviction_example() -> None:
    """docs/design/prefix_caching.md of vLLM: 10 blocks of 4 tokens."""
    kv = one_group(10, 4)
    pool = kv.groups[0].pool
    req0 = make_req(list(range(15)))
    assert admit(kv, req0) == [0, 1, 2, 3]
    assert pool.num_cached_blocks == 3
    req0.output_token_ids.append(15)
    assert compute(kv, req0, 1) == [0, 1, 2, 3]  # block 3 is now full and cached
    req0.output_token_ids.append(16)
    assert compute(kv, req0, 1) == [0, 1, 2, 3, 4]
    assert pool.num_cached_blocks == 4

    req1 = make_req(list(range(10)) + [100, 101, 102, 103])
    assert hit(kv, req1) == ([0, 1], 8)
    assert admit(kv, req1) == [0, 1, 5, 6]

    finish(kv, req0)
    assert [b.block_id for b in pool.free_block_queue] == [7, 8, 9, 4, 3, 2]
    finish(kv, req1)
    free_order = [b.block_id for b in pool.free_block_queue]
    assert free_order == [7, 8, 9, 4, 3, 2, 6, 5, 1, 0]

    req2 = make_req(list(range(12)) + list(range(200, 217)))
    assert req2.num_tokens == 29
    assert hit(kv, req2) == ([0, 1, 2], 12)
    assert admit(kv, req2) == [0, 1, 2, 7, 8, 9, 4, 3]
    assert pool.get_cached_block(hash_block_tokens(None, [0, 1, 2, 3])) is pool.blocks[0]
    pool.check_integrity()


def test_full_hit_leaves_one_token_to_compute() -> None:
    kv = one_group(8, 4)
    admit(kv, make_req(list(range(9))))
    assert hit(kv, make_req(list(range(8)))) == ([0], 4)  # capped at 7 tokens
    assert hit(kv, make_req(list(range(9)))) == ([0, 1], 8)
    assert hit(kv, make_req(list(range(12)))) == ([0, 1], 8)
    assert hit(kv, make_req([0])) == ([], 0)


def test_cache_salt_and_disabled_cache() -> None:
    kv = one_group(8, 4)
    admit(kv, make_req(list(range(9)), salt="alice"))
    assert hit(kv, make_req(list(range(9)), salt="bob")) == ([], 0)
    assert hit(kv, make_req(list(range(9)))) == ([], 0)
    assert kv.get_computed_blocks(make_req(list(range(9)), salt="alice"))[1] == 8

    off = one_group(8, 4, caching=False)
    admit(off, make_req(list(range(9))))
    assert hit(off, make_req(list(range(9)))) == ([], 0)
    assert off.groups[0].pool.num_cached_blocks == 0 and not off.req_to_block_hashes


def test_allocation_failure_allocates_nothing() -> None:
    kv = one_group(4, 4)
    a = make_req(list(range(8)))
    assert admit(kv, a) is not None
    b = make_req(list(range(50, 62)))
    assert kv.allocate_slots(b, 12) is None
    assert kv.get_block_ids(b) == ([],) and kv.num_free_blocks == 2
    assert kv.allocate_slots(b, 8) is not None
    assert kv.num_free_blocks == 0 and kv.usage == 1.0
    kv.groups[0].pool.check_integrity()


def test_hit_blocks_that_are_free_are_not_counted_twice() -> None:
    kv = one_group(4, 4)
    a = make_req(list(range(8)))
    admit(kv, a)
    finish(kv, a)
    assert kv.num_free_blocks == 4  # two of them still cached
    c = make_req(list(range(20)))
    hit_ids, num_hit = kv.get_computed_blocks(c)
    assert num_hit == 8
    # 5 blocks needed: 2 hits (free, so they leave the queue) + 3 new > 4 - 2 usable.
    assert not kv.can_allocate(c, 12, hit_ids, num_hit)
    assert kv.allocate_slots(c, 12, hit_ids, num_hit) is None
    assert kv.num_free_blocks == 4 and kv.get_block_ids(c) == ([],)
    b = make_req(list(range(16)))
    hit_ids, num_hit = kv.get_computed_blocks(b)
    assert kv.allocate_slots(b, 8, hit_ids, num_hit) == ([0, 1, 2, 3],)
    assert kv.prefix_hits == 8 and kv.prefix_queries == 8 + 16
    kv.groups[0].pool.check_integrity()


def test_free_reverse_order_and_resume_hits_own_output_blocks() -> None:
    kv = one_group(6, 2)
    req = make_req([1, 2, 3])
    admit(kv, req)
    for tok in (4, 5, 6):
        req.output_token_ids.append(tok)
        compute(kv, req, 1)
    assert kv.get_block_ids(req) == ([0, 1, 2],)
    req.output_token_ids.append(7)  # not computed yet
    req.status = RequestStatus.PREEMPTED
    kv.free(req)
    assert [b.block_id for b in kv.groups[0].pool.free_block_queue] == [3, 4, 5, 2, 1, 0]
    req.num_computed_tokens = 0
    # 7 tokens: blocks [1,2] [3,4] [5,6] are cached; the last token is recomputed.
    assert hit(kv, req) == ([0, 1, 2], 6)
    hits = kv.get_computed_blocks(req)
    assert kv.allocate_slots(req, 1, *hits) == ([0, 1, 2, 3],)


def test_hashing_is_incremental(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0  # SHA-256 computations: one per block, whether hashed alone or with others

    class CountingHashlib:
        @staticmethod
        def sha256(*args: bytes) -> object:
            nonlocal calls
            calls += 1
            return hashlib.sha256(*args)

    monkeypatch.setattr(block_hash, "hashlib", CountingHashlib)
    kv = one_group(300, 4)
    req = make_req(list(range(10)))
    admit(kv, req)
    for i in range(1000):
        req.output_token_ids.append(i)
        compute(kv, req, 1)
    assert calls == req.num_computed_tokens // 4 == 252


class KVMachine(RuleBasedStateMachine):
    """Random admit / compute / decode / preempt / finish / evict sequences, over one global
    group, a global and a sliding-window group (a hybrid model), or one windowed group.

    A fake KV store remembers, per group and slot, which token prefix produced it. Every token
    computed reads the keys its group's layers see (all earlier ones, or the window) and each
    must hold the KV of its own prefix; a prefix hit must find exactly that KV; no request may
    write into a shared or cached block; windowed groups give back what slid out.
    """

    @initialize(
        layout=st.sampled_from(["global", "hybrid", "windowed"]),
        num_blocks=st.tuples(st.integers(2, 14), st.integers(2, 14)),
        block_size=st.integers(1, 4),
        window=st.integers(1, 9),
        caching=st.booleans(),
    )
    def setup(
        self, layout: str, num_blocks: tuple[int, int], block_size: int, window: int, caching: bool
    ) -> None:
        specs = {
            "global": [KVGroupSpec(num_blocks[0])],
            "hybrid": [KVGroupSpec(num_blocks[0]), KVGroupSpec(num_blocks[1], window)],
            "windowed": [KVGroupSpec(num_blocks[0], window)],
        }[layout]
        self.kv = KVCacheManager(specs, block_size, caching)
        self.bs = block_size
        self.live: list[Request] = []
        self.paused: list[Request] = []
        self.slots: dict[tuple[int, int, int], tuple] = {}  # (group, block, offset) -> prefix

    def _key(self, req: Request, pos: int) -> tuple:
        return (req.cache_salt, tuple(req.token_slice(0, pos + 1)))

    def _visible(self, g: int, pos: int) -> range:
        window = self.kv.groups[g].window
        return range(0 if window is None else max(0, pos - window + 1), pos + 1)

    def _write(self, req: Request, start: int, end: int) -> None:
        """The runner's step: each token's KV written, then the keys it attends to read."""
        for g, group in enumerate(self.kv.groups):
            table = group.tables[req.request_id]
            for pos in range(start, end):
                block = table[pos // self.bs]
                assert block is not group.null_block, "a new token's slot was released"
                assert block.ref_cnt == 1 and block.block_hash is None
                self.slots[(g, block.block_id, pos % self.bs)] = self._key(req, pos)
            for pos in range(start, end):
                for key in self._visible(g, pos):
                    block = table[key // self.bs]
                    assert block is not group.null_block, f"key {key} in the window released"
                    assert self.slots[(g, block.block_id, key % self.bs)] == self._key(req, key)

    def _computed(self, req: Request, num_new: int) -> None:
        self._write(req, req.num_computed_tokens, req.num_computed_tokens + num_new)
        req.num_computed_tokens += num_new
        self.kv.cache_blocks(req, req.num_computed_tokens)
        self.kv.release_out_of_window(req)

    def _admit(self, req: Request, chunk: int) -> bool:
        hit_tables, num_hit = self.kv.get_computed_blocks(req)
        assert num_hit % self.bs == 0 and num_hit < req.num_tokens
        for g, (group, ids) in enumerate(zip(self.kv.groups, hit_tables, strict=True)):
            assert len(ids) * self.bs == num_hit
            # what the next query reads is there; what no query reads any more is not held
            first = self._visible(g, num_hit).start
            for pos in range(num_hit):
                block_id = ids[pos // self.bs]
                if pos // self.bs < first // self.bs:
                    assert block_id == group.null_block.block_id
                elif pos >= first:
                    assert self.slots[(g, block_id, pos % self.bs)] == self._key(req, pos)
        num_free = self.kv.num_free_blocks
        num_new = max(1, min(chunk, req.num_tokens - num_hit))
        if self.kv.allocate_slots(req, num_new, hit_tables, num_hit) is None:
            assert self.kv.num_free_blocks == num_free
            assert not any(self.kv.get_block_ids(req))
            return False
        req.num_computed_tokens = num_hit
        self._computed(req, num_new)
        return True

    @rule(
        prefix=st.sampled_from([(), (1, 2, 3, 4), (1, 2, 3, 4, 5, 6, 7, 8), (9, 9)]),
        tail=st.lists(st.integers(0, 3), max_size=6),
        salt=st.sampled_from([None, None, "s"]),
        chunk=st.integers(1, 12),
    )
    def add(self, prefix: tuple[int, ...], tail: list[int], salt: str | None, chunk: int) -> None:
        if not prefix and not tail:
            return
        req = make_req([*prefix, *tail], salt)
        if self._admit(req, chunk):
            self.live.append(req)
        else:
            req.status = RequestStatus.FINISHED_ABORTED
            self.kv.free(req)  # drops the hashes the lookup computed

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100), n=st.integers(1, 6), token=st.integers(0, 3))
    def step(self, i: int, n: int, token: int) -> None:
        req = self.live[i % len(self.live)]
        if req.num_computed_tokens == req.num_tokens:
            req.output_token_ids.append(token)
        n = min(n, req.num_tokens - req.num_computed_tokens)
        num_free = self.kv.num_free_blocks
        tables = self.kv.get_block_ids(req)
        if self.kv.allocate_slots(req, n) is None:
            assert self.kv.num_free_blocks == num_free and self.kv.get_block_ids(req) == tables
            return
        for old, new in zip(tables, self.kv.get_block_ids(req), strict=True):
            assert new[: len(old)] == old  # append-only
        self._computed(req, n)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100), preempt=st.booleans())
    def release(self, i: int, preempt: bool) -> None:
        req = self.live.pop(i % len(self.live))
        req.status = RequestStatus.PREEMPTED if preempt else RequestStatus.FINISHED_STOPPED
        self.kv.free(req)
        if preempt:
            req.num_computed_tokens = 0
            self.paused.append(req)

    @precondition(lambda self: self.paused)
    @rule(chunk=st.integers(1, 12))
    def resume(self, chunk: int) -> None:
        req = self.paused[0]
        if self._admit(req, chunk):
            self.live.append(self.paused.pop(0))

    @rule()
    def reset_cache(self) -> None:
        self.kv.reset_prefix_cache()

    @rule()
    def evict_all(self) -> None:
        """A request that needs every free block evicts every cached free block; once it is
        freed uncomputed, the free blocks hold no cached KV at all (in the groups it drained)."""
        num_free = min(g.pool.num_free_blocks for g in self.kv.groups)
        if not num_free:
            return
        base = 1000 + 1000 * next(_ids)  # fresh tokens: no hit, not cacheable by anyone else
        filler = make_req(list(range(base, base + num_free * self.bs)))
        assert self.kv.allocate_slots(filler, filler.num_tokens) is not None
        drained = [g.pool for g in self.kv.groups if g.pool.num_free_blocks == 0]
        assert drained
        for pool in drained:
            assert all(b.ref_cnt > 0 for b in pool.cached_blocks.values())
        finish(self.kv, filler)
        for pool in drained:
            assert not any(b.block_hash for b in pool.free_block_queue)

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "kv"):
            return
        for group in self.kv.groups:
            pool = group.pool
            pool.check_integrity()
            tables = [group.tables.get(r.request_id, []) for r in self.live]
            for table in tables:
                held = [b.block_id for b in table if b is not group.null_block]
                assert len(set(held)) == len(held)
            for block in pool.blocks:
                assert block.ref_cnt == sum(block in t for t in tables)
            num_used = sum(1 for b in pool.blocks if b.ref_cnt > 0)
            num_free_cached = sum(1 for b in pool.free_block_queue if b.block_hash)
            num_free_empty = sum(1 for b in pool.free_block_queue if not b.block_hash)
            # free (evictable cached + empty) + used == total; no block is free and referenced
            assert num_free_cached + num_free_empty + num_used == pool.num_blocks
            assert all(b.ref_cnt == 0 for b in pool.free_block_queue)
            assert num_free_cached <= pool.num_cached_blocks
            num_used_cached = sum(1 for b in pool.blocks if b.ref_cnt > 0 and b.block_hash)
            assert num_free_cached + num_used_cached == pool.num_cached_blocks
            if group.window is not None:  # nothing behind the window is held
                for r, table in zip(self.live, tables, strict=True):
                    first = max(0, r.num_computed_tokens - group.window + 1) // self.bs
                    assert all(b is group.null_block for b in table[:first])
        assert 0 <= self.kv.prefix_hits <= self.kv.prefix_queries
        for r in self.paused:
            assert not any(self.kv.get_block_ids(r))

    def teardown(self) -> None:
        if not hasattr(self, "kv"):
            return
        for req in self.live + self.paused:
            req.status = RequestStatus.FINISHED_ABORTED
            self.kv.free(req)
        assert self.kv.num_free_blocks == self.kv.num_blocks
        assert not any(g.tables for g in self.kv.groups) and not self.kv.req_to_block_hashes
        for group in self.kv.groups:
            group.pool.check_integrity()


TestKVMachine = KVMachine.TestCase
TestKVMachine.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


@pytest.mark.parametrize("salt", [None, "tenant-a"])
def test_block_hashes_of_a_prompt_in_one_go_are_the_chained_block_hashes(salt: str | None) -> None:
    kv = one_group(64, 4)
    req = make_req(list(range(1000, 1023)), salt)  # 5 full blocks and 3 tokens
    parent = None
    expected = []
    for i in range(5):
        parent = hash_block_tokens(parent, req.prompt_token_ids[4 * i : 4 * i + 4], salt)
        expected.append(parent)
    assert kv._block_hashes(req, 2) == expected[:2]  # two at once
    assert kv._block_hashes(req, 3) == expected[:3]  # one more, alone
    assert kv._block_hashes(req, 5) == expected  # the rest, from the last one
