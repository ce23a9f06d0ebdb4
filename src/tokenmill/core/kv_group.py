"""One KV cache group: the attention layers that share a block pool and, per request, a block
table (vLLM's hybrid KV cache manager, SGLang's split full/SWA pools).

A model whose layers all attend alike has one group. A model that interleaves sliding-window and
global layers (Gemma 2/3, Qwen2 with `max_window_layers`) has one group per window: the global
group keeps every block of a request, a windowed group gives back the blocks no future query of
its layers can see, so its KV stays bounded by the window however long the conversation grows.

Every group's table has one entry per block of the request's positions, so position p lives in
entry p // block_size of each table. A windowed group's released entries hold its null block,
which no request owns (the runner allocates it one past the group's blocks; attention masks
those positions out).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenmill.core.block_pool import BlockHash, BlockPool, KVBlock


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class KVGroupSpec:
    """A group's block count and the attention window its layers share (None: every key)."""

    num_blocks: int
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        assert self.num_blocks >= 1, self
        assert self.sliding_window is None or self.sliding_window >= 1, self


class KVGroup:
    """One group's pool and the requests' tables in it. Request-wide bookkeeping (block hashes,
    how many blocks are cached) lives in the KVCacheManager that drives every group alike."""

    def __init__(
        self,
        spec: KVGroupSpec,
        block_size: int,
        enable_caching: bool,
        max_step_tokens: int | None,
    ) -> None:
        self.spec = spec
        self.window = spec.sliding_window
        self.block_size = block_size
        self.pool = BlockPool(spec.num_blocks, enable_caching=enable_caching)
        self.null_block = KVBlock(spec.num_blocks)
        self.tables: dict[str, list[KVBlock]] = {}
        self._ids: dict[str, list[int]] = {}  # each table's block ids, kept alongside it
        self.num_released: dict[str, int] = {}  # leading entries of a request released so far
        # The most blocks a request ever holds in a windowed group at once: the window behind
        # its next query, the tokens of one step, and a partial block at each end.
        self.max_live_blocks: int | None = None
        if self.window is not None and max_step_tokens is not None:
            self.max_live_blocks = cdiv(self.window + max_step_tokens, block_size) + 1

    def first_visible_block(self, next_pos: int) -> int:
        """The first table entry a query at `next_pos` or later can read."""
        if self.window is None:
            return 0
        return max(next_pos - self.window + 1, 0) // self.block_size

    # ------------------------------------------------------------------ prefix cache

    def longest_hit(self, hashes: Sequence[BlockHash], num_blocks: int) -> int:
        """The most leading blocks, at most `num_blocks`, whose KV this group can serve from the
        cache: every block of the prefix for a global group, only the blocks that a query after
        the prefix sees for a windowed one."""
        get = self.pool.get_cached_block
        n = num_blocks
        while n > 0:
            first = self.first_visible_block(n * self.block_size)
            missing = next((j for j in range(n - 1, first - 1, -1) if get(hashes[j]) is None), -1)
            if missing < 0:
                return n
            n = missing  # any hit reaching past a missing block must see it too
        return 0

    def hit_blocks(self, hashes: Sequence[BlockHash], num_blocks: int) -> list[int]:
        """Block ids of a `num_blocks` hit (`longest_hit` said it is one): the null block where a
        windowed group needs no KV."""
        first = self.first_visible_block(num_blocks * self.block_size)
        ids = [self.null_block.block_id] * first
        for h in hashes[first:num_blocks]:
            block = self.pool.get_cached_block(h)
            assert block is not None, "not a hit"
            ids.append(block.block_id)
        return ids

    # ------------------------------------------------------------------ allocation

    def resolve(self, block_ids: Sequence[int]) -> list[KVBlock]:
        null = self.null_block.block_id
        return [self.null_block if i == null else self.pool.blocks[i] for i in block_ids]

    def shortfall(
        self, req_id: str, num_tokens: int, computed: Sequence[KVBlock], whole: bool = False
    ) -> int:
        """How many more blocks than the pool can give are needed to hold `num_tokens` in all
        (0: they fit). `whole`: the rest of the request, which a windowed group never holds at
        once (only `max_live_blocks` of it)."""
        table = self.tables.get(req_id)
        num_entries = (len(table) if table is not None else 0) + len(computed)
        num_new = max(0, cdiv(num_tokens, self.block_size) - num_entries)
        if whole and self.max_live_blocks is not None:
            num_new = min(num_new, self.max_live_blocks)
        if not num_new:
            return 0
        # Free cached blocks about to be touched leave the free queue: don't count them twice.
        num_touched_free = sum(1 for b in computed if b is not self.null_block and b.ref_cnt == 0)
        return max(0, num_new - (self.pool.num_free_blocks - num_touched_free))

    def ids_if_held(self, req_id: str, num_tokens: int) -> list[int] | None:
        """The request's block ids if the blocks it holds already cover `num_tokens` (what
        `allocate` would return without allocating), else None."""
        table = self.tables.get(req_id)
        if table is None or num_tokens > len(table) * self.block_size:
            return None
        return self._ids[req_id].copy()

    def allocate(self, req_id: str, num_tokens: int, computed: Sequence[KVBlock]) -> list[int]:
        """Appends the hit blocks and new ones up to `num_tokens`; `shortfall` said they fit."""
        table = self.tables.get(req_id)
        if table is None:
            table = self.tables[req_id] = []
            ids = self._ids[req_id] = []
            # A windowed hit starts with null entries: those count as released already.
            self.num_released[req_id] = sum(1 for b in computed if b is self.null_block)
        else:
            ids = self._ids[req_id]
        if computed:
            self.pool.touch(b for b in computed if b is not self.null_block)
            table.extend(computed)
            ids.extend([b.block_id for b in computed])
        num_new = cdiv(num_tokens, self.block_size) - len(table)
        if num_new > 0:
            new = self.pool.get_new_blocks(num_new)
            table.extend(new)
            ids.extend([b.block_id for b in new])
        return ids.copy()

    def cache(self, req_id: str, start: int, end: int, hashes: Sequence[BlockHash]) -> None:
        """Offers the request's full, computed entries start..end-1 to the prefix cache."""
        table = self.tables.get(req_id, ())
        for i in range(start, min(end, len(table))):
            if table[i] is not self.null_block:
                self.pool.cache_full_block(table[i], hashes[i])

    def release_out_of_window(self, req_id: str, num_computed_tokens: int) -> int:
        """Gives back the request's blocks that no future query can see; returns how many. The
        next query sits at num_computed_tokens and queries only move forward (a rejected draft
        rolls back no further than the computed tokens)."""
        table = self.tables.get(req_id)
        if self.window is None or not table:
            return 0
        num_dead = min(self.first_visible_block(num_computed_tokens), len(table))
        start = self.num_released.get(req_id, 0)
        if num_dead <= start:
            return 0
        # Offered to the prefix cache already (caching runs first with the same count): they
        # stay reusable in the free queue until evicted, oldest first.
        dead = [b for b in table[start:num_dead] if b is not self.null_block]
        table[start:num_dead] = [self.null_block] * (num_dead - start)
        self._ids[req_id][start:num_dead] = [self.null_block.block_id] * (num_dead - start)
        self.pool.free_blocks(dead)
        self.num_released[req_id] = num_dead
        return len(dead)

    def num_held(self, req_id: str) -> int:
        """Pool blocks the request holds (released entries not counted)."""
        return sum(1 for b in self.tables.get(req_id, ()) if b is not self.null_block)

    def free(self, req_id: str) -> None:
        """Releases the request's blocks, last block first so it is evicted first."""
        table = self.tables.pop(req_id, [])
        self._ids.pop(req_id, None)
        self.pool.free_blocks(b for b in reversed(table) if b is not self.null_block)
        self.num_released.pop(req_id, None)
