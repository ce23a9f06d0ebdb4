"""Ref-counted KV blocks with an LRU free queue and a hash -> block map (vLLM v1 style).

A block is either free (ref_cnt == 0, in the free queue) or used (ref_cnt > 0, not in the
queue). A free block may still carry a `block_hash`: its KV stays valid and reusable until
`get_new_blocks` hands the block out again, which evicts the hash lazily.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

BlockHash = bytes


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    # Links of the free queue; both are None exactly when the block is not in the queue.
    prev_free: KVBlock | None = field(default=None, repr=False)
    next_free: KVBlock | None = field(default=None, repr=False)

    @property
    def in_free_queue(self) -> bool:
        return self.prev_free is not None


class FreeBlockQueue:
    """Doubly linked list of free blocks in eviction order (head first), O(1) everywhere."""

    def __init__(self, blocks: Iterable[KVBlock] = ()) -> None:
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self._len = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[KVBlock]:
        node = self._head.next_free
        while node is not self._tail:
            assert node is not None
            yield node
            node = node.next_free

    def append(self, block: KVBlock) -> None:
        assert not block.in_free_queue, f"block {block.block_id} is already free"
        last = self._tail.prev_free
        assert last is not None
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self._len += 1

    def remove(self, block: KVBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        assert prev is not None and nxt is not None, f"block {block.block_id} is not free"
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self._len -= 1

    def popleft(self) -> KVBlock:
        if self._len == 0:
            raise IndexError("no free blocks")
        block = self._head.next_free
        assert block is not None
        self.remove(block)
        return block


class BlockPool:
    """All KV blocks of one cache. Tests call `check_integrity()` after every operation."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_block_queue = FreeBlockQueue(self.blocks)
        # One block per hash: a second full block with the same content stays unmapped.
        self.cached_blocks: dict[BlockHash, KVBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_block_queue)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached_blocks)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def get_new_blocks(self, num_blocks: int) -> list[KVBlock]:
        """Take `num_blocks` from the head of the free queue, each with ref_cnt 1."""
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"cannot get {num_blocks} blocks, only {self.num_free_blocks} free")
        out = []
        for _ in range(num_blocks):
            block = self.free_block_queue.popleft()
            self.evict_cached_block(block)
            assert block.ref_cnt == 0
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on (cached) blocks, pulling free ones out of the eviction queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_block_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference each; blocks reaching 0 join the queue tail in the given order."""
        for block in blocks:
            assert block.ref_cnt > 0, f"double free of block {block.block_id}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_block_queue.append(block)

    def cache_full_block(self, block: KVBlock, block_hash: BlockHash) -> bool:
        """Register a full, computed block under its hash. False if not cached (duplicate)."""
        if not self.enable_caching or block.block_hash is not None:
            return False
        if block_hash in self.cached_blocks:
            return False
        block.block_hash = block_hash
        self.cached_blocks[block_hash] = block
        return True

    def get_cached_block(self, block_hash: BlockHash) -> KVBlock | None:
        return self.cached_blocks.get(block_hash)

    def evict_cached_block(self, block: KVBlock) -> bool:
        """Forget a block's hash (its KV is about to be overwritten). True if it had one."""
        if block.block_hash is None:
            return False
        del self.cached_blocks[block.block_hash]
        block.block_hash = None
        return True

    def reset_prefix_cache(self) -> int:
        """Forget every cached hash; blocks in use stay allocated. Returns how many were dropped."""
        num = len(self.cached_blocks)
        for block in self.cached_blocks.values():
            block.block_hash = None
        self.cached_blocks.clear()
        return num

    def check_integrity(self) -> None:
        seen: set[int] = set()
        for block in self.free_block_queue:
            assert block.block_id not in seen, f"block {block.block_id} twice in free queue"
            assert block.ref_cnt == 0, f"free block {block.block_id} has ref {block.ref_cnt}"
            assert self.blocks[block.block_id] is block
            seen.add(block.block_id)
        assert len(seen) == len(self.free_block_queue)
        num_used = 0
        for block in self.blocks:
            if block.block_id in seen:
                assert block.in_free_queue
            else:
                assert block.ref_cnt > 0, f"block {block.block_id} neither free nor referenced"
                assert not block.in_free_queue and block.next_free is None
                num_used += 1
            if block.block_hash is not None:
                assert self.cached_blocks.get(block.block_hash) is block, "hash map out of sync"
        assert num_used + len(seen) == self.num_blocks
        for block_hash, block in self.cached_blocks.items():
            assert block.block_hash == block_hash
            assert self.blocks[block.block_id] is block
        if not self.enable_caching:
            assert not self.cached_blocks
