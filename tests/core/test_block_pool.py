from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.core.block_pool import BlockPool, FreeBlockQueue, KVBlock


def free_ids(pool: BlockPool) -> list[int]:
    return [b.block_id for b in pool.free_block_queue]


def test_free_queue_remove_from_middle_and_order() -> None:
    blocks = [KVBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    q.remove(blocks[2])
    q.remove(blocks[0])
    assert [b.block_id for b in q] == [1, 3, 4]
    q.append(blocks[2])
    assert q.popleft() is blocks[1]
    assert [b.block_id for b in q] == [3, 4, 2]
    assert len(q) == 3
    with pytest.raises(AssertionError):
        q.append(blocks[3])  # already queued


def test_new_pool_all_free() -> None:
    pool = BlockPool(8)
    pool.check_integrity()
    assert pool.num_free_blocks == 8 and pool.usage == 0.0
    blocks = pool.get_new_blocks(3)
    assert [b.block_id for b in blocks] == [0, 1, 2]
    assert all(b.ref_cnt == 1 for b in blocks)
    assert pool.num_free_blocks == 5 and pool.usage == 3 / 8
    pool.check_integrity()
    with pytest.raises(ValueError):
        pool.get_new_blocks(6)


def test_free_goes_to_tail_in_given_order() -> None:
    pool = BlockPool(4)
    a, b, c = pool.get_new_blocks(3)
    pool.free_blocks([c, b, a])
    assert free_ids(pool) == [3, 2, 1, 0]
    pool.check_integrity()
    with pytest.raises(AssertionError):
        pool.free_blocks([a])  # double free


def test_touch_shared_block_and_lazy_eviction() -> None:
    pool = BlockPool(4)
    a, b = pool.get_new_blocks(2)
    assert pool.cache_full_block(a, b"h-a")
    pool.free_blocks([a, b])
    assert free_ids(pool) == [2, 3, 0, 1]
    # A freed block keeps its hash and can be revived from the middle of the queue.
    assert pool.get_cached_block(b"h-a") is a
    pool.touch([a, a])
    assert a.ref_cnt == 2 and free_ids(pool) == [2, 3, 1]
    pool.check_integrity()
    pool.free_blocks([a, a])
    assert free_ids(pool) == [2, 3, 1, 0]
    # Reusing the block for new content evicts its hash.
    got = pool.get_new_blocks(4)
    assert [x.block_id for x in got] == [2, 3, 1, 0]
    assert a.block_hash is None and pool.get_cached_block(b"h-a") is None
    pool.check_integrity()


def test_duplicate_hash_not_mapped_and_reset() -> None:
    pool = BlockPool(3)
    a, b = pool.get_new_blocks(2)
    assert pool.cache_full_block(a, b"h")
    assert not pool.cache_full_block(b, b"h")
    assert not pool.cache_full_block(a, b"other")  # already hashed
    assert b.block_hash is None and pool.num_cached_blocks == 1
    assert pool.reset_prefix_cache() == 1
    assert a.block_hash is None and a.ref_cnt == 1
    pool.check_integrity()


def test_caching_disabled() -> None:
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.get_new_blocks(1)
    assert not pool.cache_full_block(a, b"h")
    pool.check_integrity()


@settings(max_examples=150, deadline=None)
@given(
    num_blocks=st.integers(1, 12),
    ops=st.lists(st.tuples(st.sampled_from("gftcr"), st.integers(0, 20)), max_size=60),
)
def test_pool_random_ops_keep_integrity(num_blocks: int, ops: list[tuple[str, int]]) -> None:
    pool = BlockPool(num_blocks)
    refs: list[KVBlock] = []  # one entry per reference we hold
    for op, x in ops:
        if op == "g" and pool.num_free_blocks:
            refs.extend(pool.get_new_blocks(1 + x % pool.num_free_blocks))
        elif op == "f" and refs:
            pool.free_blocks([refs.pop(x % len(refs))])
        elif op == "t":
            block = pool.get_cached_block(bytes([x]))
            if block is not None:
                pool.touch([block])
                refs.append(block)
        elif op == "c" and refs:
            pool.cache_full_block(refs[x % len(refs)], bytes([x]))
        elif op == "r":
            pool.reset_prefix_cache()
        pool.check_integrity()
        for block in pool.blocks:
            assert block.ref_cnt == sum(1 for r in refs if r is block)
    pool.free_blocks(refs)
    assert pool.num_free_blocks == num_blocks
    pool.check_integrity()
