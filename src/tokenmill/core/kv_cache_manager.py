"""Per-request block tables on top of a BlockPool, with automatic prefix caching.

A full block is identified by a chained SHA-256 over (parent hash, its token ids, extra key), so
a hit means the whole prefix up to that block is identical and its KV can be reused. Only full,
computed blocks are ever cached; block tables grow at the end only.

Sliding-window attention (every layer with the same window): once no future query of a request
can see a block any more, the block goes back to the pool (still cached for prefix reuse) and
its place in the table holds the null block, which no request owns (the runner allocates it one
past the pool's blocks; attention masks those positions out). A long request then holds about
window / block_size blocks, whatever its length.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from tokenmill.core.block_pool import BlockHash, BlockPool, KVBlock
from tokenmill.request import Request

_ROOT_HASH = hashlib.sha256(b"tokenmill-kv-root").digest()


def hash_block_tokens(
    parent_hash: BlockHash | None, token_ids: Sequence[int], extra_key: str | None = None
) -> BlockHash:
    """Stable hash of one full block given its parent block's hash (None for the first block)."""
    h = hashlib.sha256(parent_hash if parent_hash is not None else _ROOT_HASH)
    h.update(struct.pack(f"<I{len(token_ids)}q", len(token_ids), *token_ids))
    # The token count is encoded above, so the extra key cannot be confused with tokens.
    h.update(b"\x00" if extra_key is None else b"\x01" + extra_key.encode("utf-8"))
    return h.digest()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class KVCacheStats:
    """A snapshot of the KV cache's occupancy and prefix-cache counters."""

    num_used_blocks: int
    num_total_blocks: int
    usage: float  # fraction of the blocks in use
    prefix_queries: int  # prompt tokens looked up at admission
    prefix_hits: int  # of those, tokens served from the cache


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        sliding_window: int | None = None,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        assert sliding_window is None or sliding_window >= 1
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.sliding_window = sliding_window
        # Stands in the tables for blocks released behind the window: the runner's null block.
        self.null_block = KVBlock(num_blocks)
        self.num_released: dict[str, int] = {}  # leading blocks of a request released so far
        self.block_pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self.req_to_blocks: dict[str, list[KVBlock]] = {}
        # Hashes of the request's full blocks, extended incrementally; kept across preemption.
        self.req_to_block_hashes: dict[str, list[BlockHash]] = {}
        # How many leading blocks of the request have been offered to the hash map already.
        self.num_cached_block: dict[str, int] = {}
        self.prefix_queries = 0  # tokens looked up at admission
        self.prefix_hits = 0  # of those, tokens served from the cache

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    def stats(self) -> KVCacheStats:
        pool = self.block_pool
        return KVCacheStats(
            num_used_blocks=pool.num_used_blocks,
            num_total_blocks=pool.num_blocks,
            usage=pool.usage,
            prefix_queries=self.prefix_queries,
            prefix_hits=self.prefix_hits,
        )

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def get_block_ids(self, req: Request) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(req.request_id, ())]

    def _block_hashes(self, req: Request, num_full_blocks: int) -> list[BlockHash]:
        hashes = self.req_to_block_hashes.setdefault(req.request_id, [])
        bs = self.block_size
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            tokens = req.token_slice(i * bs, (i + 1) * bs)
            hashes.append(hash_block_tokens(parent, tokens, req.cache_salt))
        return hashes

    def get_computed_blocks(self, req: Request) -> tuple[list[int], int]:
        """Longest cached prefix of the request's tokens: (block ids, number of tokens).

        At least one token is always left to compute, so the runner has logits to sample from.
        The lookup keeps the request's block hashes: `free(req)` once it is finished drops them.
        """
        if not self.enable_prefix_caching or req.num_tokens <= 1:
            return [], 0
        if req.sampling_params.prompt_logprobs is not None:
            return [], 0  # cached positions would get no prompt logprobs
        max_blocks = (req.num_tokens - 1) // self.block_size
        block_ids = []
        for block_hash in self._block_hashes(req, max_blocks)[:max_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            block_ids.append(block.block_id)
        return block_ids, len(block_ids) * self.block_size

    def first_uncached_block_hash(self, req: Request, num_cached: int) -> BlockHash | None:
        """Hash of the block after a `num_cached`-token hit (from the last lookup), if full."""
        hashes = self.req_to_block_hashes.get(req.request_id, ())
        i = num_cached // self.block_size
        return hashes[i] if i < len(hashes) else None

    def uncomputed_block_hashes(self, req: Request) -> list[BlockHash]:
        """Hashes of full blocks the request holds but has not computed (cached) yet: the KV
        that becomes reusable by other requests over the next steps."""
        req_id = req.request_id
        hashes = self.req_to_block_hashes.get(req_id, [])
        num_held = len(self.req_to_blocks.get(req_id, ()))
        return hashes[self.num_cached_block.get(req_id, 0) : num_held]

    def _num_blocks_to_allocate(
        self, req: Request, num_tokens: int, new_computed: Sequence[KVBlock]
    ) -> tuple[int, int]:
        """(new blocks needed, free blocks usable for them) to hold `num_tokens` in total."""
        num_held = len(self.req_to_blocks.get(req.request_id, ())) + len(new_computed)
        num_new = max(0, cdiv(num_tokens, self.block_size) - num_held)
        # Free cached blocks we are about to touch leave the free queue: don't count them twice.
        num_touched_free = sum(1 for b in new_computed if b.ref_cnt == 0)
        return num_new, self.block_pool.num_free_blocks - num_touched_free

    def can_allocate(
        self,
        req: Request,
        num_new_tokens: int,
        new_computed_blocks: Sequence[int] = (),
        num_new_computed_tokens: int = 0,
    ) -> bool:
        """Whether `allocate_slots` with these arguments would succeed right now."""
        computed = [self.block_pool.blocks[i] for i in new_computed_blocks]
        total = req.num_computed_tokens + num_new_computed_tokens + num_new_tokens
        num_new, num_usable = self._num_blocks_to_allocate(req, total, computed)
        return num_new <= num_usable

    def allocate_slots(
        self,
        req: Request,
        num_new_tokens: int,
        new_computed_blocks: Sequence[int] = (),
        num_new_computed_tokens: int = 0,
        num_lookahead_tokens: int = 0,
    ) -> list[int] | None:
        """Make room for `num_new_tokens` more tokens (after any newly hit prefix blocks).

        Returns the request's whole block table, or None, having allocated nothing, when the
        free blocks (evictable cached ones included) cannot hold them.
        """
        assert num_new_tokens >= 0 and num_lookahead_tokens >= 0
        assert num_new_computed_tokens == len(new_computed_blocks) * self.block_size
        req_id = req.request_id
        computed = [self.block_pool.blocks[i] for i in new_computed_blocks]
        if computed:
            assert req.num_computed_tokens == 0 and not self.req_to_blocks.get(req_id)
        total = (
            req.num_computed_tokens
            + num_new_computed_tokens
            + num_new_tokens
            + num_lookahead_tokens
        )
        num_new, num_usable = self._num_blocks_to_allocate(req, total, computed)
        if num_new > num_usable:
            return None

        blocks = self.req_to_blocks.get(req_id)
        if not blocks:
            # First allocation since admission (new or resumed): count the prefix lookup.
            if self.enable_prefix_caching:
                self.prefix_queries += req.num_tokens
                self.prefix_hits += num_new_computed_tokens
            blocks = self.req_to_blocks[req_id] = []
            self.num_cached_block[req_id] = len(computed)
        self.block_pool.touch(computed)
        blocks.extend(computed)
        blocks.extend(self.block_pool.get_new_blocks(num_new))
        return [b.block_id for b in blocks]

    def cache_blocks(self, req: Request, num_computed_tokens: int) -> None:
        """Register the request's blocks that became full now that the runner computed them."""
        if not self.enable_prefix_caching:
            return
        req_id = req.request_id
        blocks = self.req_to_blocks.get(req_id)
        if not blocks:
            return
        num_full = min(num_computed_tokens // self.block_size, len(blocks))
        start = self.num_cached_block.get(req_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(req, num_full)
        for i in range(start, num_full):
            self.block_pool.cache_full_block(blocks[i], hashes[i])
        self.num_cached_block[req_id] = num_full

    def release_out_of_window(self, req: Request) -> int:
        """With a sliding window, gives back the request's blocks that no future query can see;
        returns how many. The next query sits at position num_computed_tokens and sees keys after
        num_computed_tokens - window, and queries only move forward (a rejected draft rolls back
        no further than the computed tokens)."""
        if self.sliding_window is None:
            return 0
        req_id = req.request_id
        blocks = self.req_to_blocks.get(req_id)
        if not blocks:
            return 0
        first_visible = req.num_computed_tokens - self.sliding_window + 1
        num_dead = min(max(first_visible, 0) // self.block_size, len(blocks))
        start = self.num_released.get(req_id, 0)
        if num_dead <= start:
            return 0
        # Already offered to the prefix cache (cache_blocks runs first with the same count):
        # they stay reusable in the free queue until evicted, oldest first.
        dead = blocks[start:num_dead]
        blocks[start:num_dead] = [self.null_block] * len(dead)
        self.block_pool.free_blocks(dead)
        self.num_released[req_id] = num_dead
        return len(dead)

    def num_held_blocks(self, req: Request) -> int:
        """Pool blocks the request holds (released ones not counted)."""
        blocks = self.req_to_blocks.get(req.request_id, ())
        return sum(1 for b in blocks if b is not self.null_block)

    def free(self, req: Request) -> None:
        """Release the request's blocks, last block first so it is evicted first.

        Block hashes are kept unless the request is finished: a preempted request reuses them.
        """
        req_id = req.request_id
        blocks = self.req_to_blocks.pop(req_id, [])
        self.block_pool.free_blocks(b for b in reversed(blocks) if b is not self.null_block)
        self.num_cached_block.pop(req_id, None)
        self.num_released.pop(req_id, None)
        if req.is_finished:
            self.req_to_block_hashes.pop(req_id, None)

    def reset_prefix_cache(self) -> int:
        """Drop all cached hashes (e.g. after weights change). Returns how many were dropped."""
        return self.block_pool.reset_prefix_cache()
