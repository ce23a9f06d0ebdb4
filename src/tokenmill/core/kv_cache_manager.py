"""Per-request block tables, one per KV cache group (core/kv_group.py), with automatic prefix
caching.

A full block is identified by a chained SHA-256 over (parent hash, its token ids, extra key;
core/block_hash.py), so a hit means the whole prefix up to that block is identical and its KV
can be reused. Only full, computed blocks are ever cached; block tables grow at the end only.
Every group caches the same hashes in its own pool, and a prefix hit is the longest one every
group can serve: a global group needs each block of the prefix, a sliding-window group only the
window behind it.

Sliding-window groups give back blocks once no future query can see them (still cached for
prefix reuse); the table keeps the group's null block in their place. A long request then holds
about window / block_size blocks of such a group, whatever its length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenmill.core.block_hash import chain_hashes, hash_block_tokens
from tokenmill.core.block_pool import BlockHash
from tokenmill.core.kv_group import KVGroup, KVGroupSpec
from tokenmill.request import Request


@dataclass(frozen=True)
class KVCacheStats:
    """A snapshot of the KV cache's occupancy and prefix-cache counters."""

    num_used_blocks: int
    num_total_blocks: int
    usage: float  # fraction of the blocks in use, in the fullest group
    prefix_queries: int  # prompt tokens looked up at admission
    prefix_hits: int  # of those, tokens served from the cache


BlockTables = tuple[list[int], ...]  # one block table per KV cache group


class KVCacheManager:
    """`groups`: the KV cache groups in the runner's order. `max_step_tokens` (the scheduler's
    token budget) bounds what a windowed group holds of one request at once, which admission
    checks instead of the request's whole length."""

    def __init__(
        self,
        groups: Sequence[KVGroupSpec],
        block_size: int,
        enable_prefix_caching: bool = True,
        max_step_tokens: int | None = None,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        assert groups, "at least one KV cache group"
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.groups = [
            KVGroup(spec, block_size, enable_prefix_caching, max_step_tokens) for spec in groups
        ]
        self._global_groups = [g for g in self.groups if g.window is None]
        self._windowed_groups = [g for g in self.groups if g.window is not None]
        self._no_hit: list[list] = [[] for _ in self.groups]  # never mutated
        self._single = self.groups[0] if len(self.groups) == 1 else None
        # Hashes of the request's full blocks, extended incrementally; kept across preemption.
        self.req_to_block_hashes: dict[str, list[BlockHash]] = {}
        # How many leading blocks of the request have been offered to the prefix cache already
        # (the same in every group: they all cache together).
        self.num_cached_block: dict[str, int] = {}
        self.prefix_queries = 0  # tokens looked up at admission
        self.prefix_hits = 0  # of those, tokens served from the cache

    @property
    def num_blocks(self) -> int:
        return sum(g.pool.num_blocks for g in self.groups)

    @property
    def num_free_blocks(self) -> int:
        return sum(g.pool.num_free_blocks for g in self.groups)

    @property
    def usage(self) -> float:
        """The fraction of blocks in use in the fullest group: the one that preempts first."""
        return max(g.pool.usage for g in self.groups)

    def stats(self) -> KVCacheStats:
        return KVCacheStats(
            num_used_blocks=sum(g.pool.num_used_blocks for g in self.groups),
            num_total_blocks=self.num_blocks,
            usage=self.usage,
            prefix_queries=self.prefix_queries,
            prefix_hits=self.prefix_hits,
        )

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def get_block_ids(self, req: Request) -> BlockTables:
        req_id = req.request_id
        return tuple([b.block_id for b in g.tables.get(req_id, ())] for g in self.groups)

    def _block_hashes(self, req: Request, num_full_blocks: int) -> list[BlockHash]:
        hashes = self.req_to_block_hashes.setdefault(req.request_id, [])
        bs = self.block_size
        start = len(hashes)
        n = (num_full_blocks - start) * bs
        if n > bs:  # several blocks (a prompt's lookup): their tokens packed in one go
            tokens = req.token_slice(start * bs, num_full_blocks * bs)
            if len(tokens) == n:
                chain_hashes(hashes, tokens, bs, req.cache_salt)
                return hashes
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            tokens = req.token_slice(i * bs, (i + 1) * bs)
            hashes.append(hash_block_tokens(parent, tokens, req.cache_salt))
        return hashes

    def get_computed_blocks(self, req: Request) -> tuple[BlockTables, int]:
        """Longest cached prefix of the request's tokens: (each group's blocks, token count).

        At least one token is always left to compute, so the runner has logits to sample from.
        The lookup keeps the request's block hashes: `free(req)` once it is finished drops them.
        """
        n = self._num_hit_blocks(req)
        if n == 0:
            return tuple([] for _ in self.groups), 0
        hashes = self.req_to_block_hashes[req.request_id]
        return tuple(g.hit_blocks(hashes, n) for g in self.groups), n * self.block_size

    def num_computed_tokens(self, req: Request) -> int:
        """The token count of `get_computed_blocks`, without building the block lists."""
        return self._num_hit_blocks(req) * self.block_size

    def _num_hit_blocks(self, req: Request) -> int:
        if not self.enable_prefix_caching or req.num_tokens <= 1:
            return 0
        if req.sampling_params.prompt_logprobs is not None:
            return 0  # cached positions would get no prompt logprobs
        max_blocks = (req.num_tokens - 1) // self.block_size
        hashes = self._block_hashes(req, max_blocks)
        n = max_blocks
        for group in self._global_groups:  # a prefix of a hit is a hit: one pass each
            n = group.longest_hit(hashes, n)
        # A shorter prefix sees other blocks through a window: shrink until all groups agree.
        while self._windowed_groups:
            shortest = min(g.longest_hit(hashes, n) for g in self._windowed_groups)
            if shortest == n:
                break
            n = shortest
        return n

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
        num_entries = len(self.groups[0].tables.get(req_id, ()))
        return hashes[self.num_cached_block.get(req_id, 0) : num_entries]

    def _resolve(self, new_computed_blocks: BlockTables) -> list[list]:
        if not new_computed_blocks:
            return [[] for _ in self.groups]
        assert len(new_computed_blocks) == len(self.groups)
        return [g.resolve(ids) for g, ids in zip(self.groups, new_computed_blocks, strict=True)]

    def can_allocate(
        self,
        req: Request,
        num_new_tokens: int,
        new_computed_blocks: BlockTables = (),
        num_new_computed_tokens: int = 0,
    ) -> bool:
        """Whether the request's remaining `num_new_tokens` (after any newly hit prefix) fit now,
        as much of them as each group ever holds at once."""
        computed = self._resolve(new_computed_blocks)
        total = req.num_computed_tokens + num_new_computed_tokens + num_new_tokens
        return not any(
            g.shortfall(req.request_id, total, blocks, whole=True)
            for g, blocks in zip(self.groups, computed, strict=True)
        )

    def allocate_slots(
        self,
        req: Request,
        num_new_tokens: int,
        new_computed_blocks: BlockTables = (),
        num_new_computed_tokens: int = 0,
        num_lookahead_tokens: int = 0,
    ) -> BlockTables | None:
        """Make room for `num_new_tokens` more tokens (after any newly hit prefix blocks).

        Returns the request's block tables, or None, having allocated nothing, when some group's
        free blocks (evictable cached ones included) cannot hold them.
        """
        assert num_new_tokens >= 0 and num_lookahead_tokens >= 0
        req_id = req.request_id
        if self._single is not None and not new_computed_blocks:
            # Most steps of a running request (decodes) fit in the blocks it holds already.
            ids = self._single.ids_if_held(
                req_id, req.num_computed_tokens + num_new_tokens + num_lookahead_tokens
            )
            if ids is not None:
                return (ids,)
        # No new hit (every step of a running request): nothing to resolve.
        computed = self._resolve(new_computed_blocks) if new_computed_blocks else self._no_hit
        if num_new_computed_tokens:
            assert all(len(c) * self.block_size == num_new_computed_tokens for c in computed)
            assert req.num_computed_tokens == 0 and req_id not in self.groups[0].tables
        total = (
            req.num_computed_tokens
            + num_new_computed_tokens
            + num_new_tokens
            + num_lookahead_tokens
        )
        if any(
            g.shortfall(req_id, total, blocks)
            for g, blocks in zip(self.groups, computed, strict=True)
        ):
            return None
        if req_id not in self.groups[0].tables:
            # First allocation since admission (new or resumed): count the prefix lookup.
            if self.enable_prefix_caching:
                self.prefix_queries += req.num_tokens
                self.prefix_hits += num_new_computed_tokens
            self.num_cached_block[req_id] = num_new_computed_tokens // self.block_size
        return tuple(
            g.allocate(req_id, total, blocks)
            for g, blocks in zip(self.groups, computed, strict=True)
        )

    def cache_blocks(self, req: Request, num_computed_tokens: int) -> None:
        """Register the request's blocks that became full now that the runner computed them."""
        if not self.enable_prefix_caching:
            return
        req_id = req.request_id
        num_entries = len(self.groups[0].tables.get(req_id, ()))
        num_full = min(num_computed_tokens // self.block_size, num_entries)
        start = self.num_cached_block.get(req_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(req, num_full)
        for group in self.groups:
            group.cache(req_id, start, num_full, hashes)
        self.num_cached_block[req_id] = num_full

    def release_out_of_window(self, req: Request) -> int:
        """Gives back, in each sliding-window group, the request's blocks that no future query
        can see; returns how many in all."""
        if not self._windowed_groups:
            return 0
        n = req.num_computed_tokens
        return sum(g.release_out_of_window(req.request_id, n) for g in self._windowed_groups)

    def num_held_blocks(self, req: Request) -> tuple[int, ...]:
        """Pool blocks the request holds in each group (released ones not counted)."""
        return tuple(g.num_held(req.request_id) for g in self.groups)

    def free(self, req: Request) -> None:
        """Release the request's blocks in every group.

        Block hashes are kept unless the request is finished: a preempted request reuses them.
        """
        req_id = req.request_id
        for group in self.groups:
            group.free(req_id)
        self.num_cached_block.pop(req_id, None)
        if req.is_finished:
            self.req_to_block_hashes.pop(req_id, None)

    def reset_prefix_cache(self) -> int:
        """Drop all cached hashes (e.g. after weights change). Returns how many were dropped."""
        return sum(g.pool.reset_prefix_cache() for g in self.groups)
