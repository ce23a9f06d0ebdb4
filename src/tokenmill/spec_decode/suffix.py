"""SuffixDecoding (path mode): drafts from suffix trees of the request and of earlier outputs.

Per request, a tree over its prompt + output (extended as it generates); globally, a tree over
the outputs of the last `max_cached_requests` finished requests (oldest evicted first; one tree
per cache_salt, so tenants that salt their prompts never see each other's outputs). For every
match length p (the last p tokens found in a tree), the most frequent continuation is followed
while its probability stays >= min_token_prob, up to min(max_drafts, max_spec_factor * p +
max_spec_offset) tokens: long matches earn long drafts. The draft with the best score (expected
accepted tokens) over all p and both trees wins.

Defaults: Arctic uses max_spec_offset 0; here it is -1 (a 1-token match drafts nothing) because
on a CPU every verified row costs about 7% of a batch-1 step (benchmarks/speculative.py): on
plain chat that halves the wasted drafts for ~10% fewer accepted tokens on repetitive text.
"""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass

from tokenmill.request import Request
from tokenmill.spec_decode.proposer import Proposer
from tokenmill.spec_decode.suffix_tree import SuffixTree

# Match lengths that have an earlier occurrence tried per tree, longest first. Shorter matches
# have more continuations (a wide max() per draft step) and rarely beat a longer one; trying
# every one cost up to ~1 ms per engine step at 8 requests on plain chat (~9% of the step).
MAX_MATCHES_TRIED = 4


@dataclass
class _ReqState:
    req: Request
    tree: SuffixTree  # prompt + output of this request alone
    num_ingested: int = 0


class SuffixProposer(Proposer):
    def __init__(
        self,
        max_depth: int = 24,
        max_cached_requests: int = 1000,
        min_token_prob: float = 0.1,
        max_spec_factor: float = 1.0,
        max_spec_offset: float = -1.0,
    ) -> None:
        if max_cached_requests < 0:
            raise ValueError(f"max_cached_requests must be >= 0, got {max_cached_requests}")
        self.max_depth = max_depth
        self.max_cached_requests = max_cached_requests
        self.min_token_prob = min_token_prob
        self.max_spec_factor = max_spec_factor
        self.max_spec_offset = max_spec_offset
        self._reqs: dict[str, _ReqState] = {}
        self._global: dict[str | None, SuffixTree] = {}  # by cache_salt
        self._cached: collections.deque[tuple[str | None, int]] = collections.deque()
        self._seq_ids = itertools.count()

    def propose(self, reqs: list[Request], max_drafts: list[int]) -> list[list[int]]:
        return [self._propose_one(r, k) for r, k in zip(reqs, max_drafts, strict=True)]

    def _propose_one(self, req: Request, max_draft: int) -> list[int]:
        state = self._reqs.get(req.request_id)
        if state is None:
            state = self._reqs[req.request_id] = _ReqState(req, SuffixTree(self.max_depth))
        if state.num_ingested < req.num_tokens:
            state.tree.extend(0, req.token_slice(state.num_ingested, req.num_tokens))
            state.num_ingested = req.num_tokens

        best: list[int] = []
        best_score = 0.0
        # Longest match first: a draft's score is at most its length, and the budget shrinks
        # with the match, so once the best score reaches the budget no shorter match can win.
        # Own tree: its active nodes are the matches; each count includes the live occurrence
        # at the very end, which has no continuation yet.
        own = state.tree
        active = own.active_nodes(0)
        tried = 0
        for p in range(len(active), 0, -1):
            budget = self._budget(p, max_draft)
            if best_score >= budget or tried == MAX_MATCHES_TRIED:
                break
            node = active[p - 1]
            count = own.node_count(node)
            if count < 2:
                continue  # no earlier occurrence
            tried += 1
            tokens, score = own.draft_path(node, budget, self.min_token_prob, count - 1)
            if score > best_score:
                best, best_score = tokens, score
        tree = self._global.get(req.cache_salt)
        if tree is not None and len(tree):
            n = req.num_tokens
            context = req.token_slice(max(0, n - self.max_depth), n)
            matches = tree.match(context, self.max_depth)
            for p in range(len(matches), max(0, len(matches) - MAX_MATCHES_TRIED), -1):  # all occur
                budget = self._budget(p, max_draft)
                if best_score >= budget:
                    break
                node = matches[p - 1]
                tokens, score = tree.draft_path(
                    node, budget, self.min_token_prob, tree.node_count(node)
                )
                if score > best_score:
                    best, best_score = tokens, score
        return best

    def _budget(self, match_len: int, max_draft: int) -> int:
        return min(max_draft, math.floor(self.max_spec_factor * match_len + self.max_spec_offset))

    def finish(self, req_ids: Iterable[str]) -> None:
        for req_id in req_ids:
            state = self._reqs.pop(req_id, None)
            if state is None or self.max_cached_requests == 0:
                continue
            req = state.req
            if not req.output_token_ids:
                continue
            salt = req.cache_salt
            tree = self._global.get(salt)
            if tree is None:
                tree = self._global[salt] = SuffixTree(self.max_depth)
            seq_id = next(self._seq_ids)
            tree.extend(seq_id, req.output_token_ids)
            self._cached.append((salt, seq_id))
            while len(self._cached) > self.max_cached_requests:
                old_salt, old_id = self._cached.popleft()
                old_tree = self._global[old_salt]
                old_tree.remove(old_id)
                if not len(old_tree):
                    del self._global[old_salt]
