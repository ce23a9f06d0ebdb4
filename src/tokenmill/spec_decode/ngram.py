"""N-gram prompt lookup: find the last n tokens earlier in prompt + output, draft what followed."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from tokenmill.request import Request
from tokenmill.spec_decode.proposer import Proposer


def ngram_lookup(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the longest matching
    tail n-gram (max_n down to min_n) of `tokens` [L]; [] when none occurs."""
    num = len(tokens)
    for n in range(min(max_n, num - 1), min_n - 1, -1):
        tail = tokens[num - n :]
        # Windows start before num - n so that each has a continuation and the tail itself is
        # not a match.
        windows = sliding_window_view(tokens[: num - 1], n)  # [num - n, n]
        hits = np.flatnonzero((windows == tail).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return tokens[start : start + k].tolist()
    return []


class _TokenBuffer:
    """A request's prompt + output as a growing numpy array (outputs are append-only)."""

    def __init__(self, req: Request) -> None:
        self.data = np.empty(max(64, 2 * req.num_tokens), dtype=np.int64)
        self.size = 0

    def sync(self, req: Request) -> np.ndarray:
        if req.num_tokens > len(self.data):
            self.data = np.resize(self.data, 2 * req.num_tokens)
        if self.size < req.num_tokens:
            self.data[self.size : req.num_tokens] = req.token_slice(self.size, req.num_tokens)
            self.size = req.num_tokens
        return self.data[: self.size]


class NgramProposer(Proposer):
    def __init__(self, min_n: int = 3, max_n: int = 4) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(
                f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {min_n}, {max_n}"
            )
        self.min_n = min_n
        self.max_n = max_n
        self._buffers: dict[str, _TokenBuffer] = {}

    def propose(self, reqs: list[Request], max_drafts: list[int]) -> list[list[int]]:
        out = []
        for req, k in zip(reqs, max_drafts, strict=True):
            buf = self._buffers.get(req.request_id)
            if buf is None:
                buf = self._buffers[req.request_id] = _TokenBuffer(req)
            out.append(ngram_lookup(buf.sync(req), self.min_n, self.max_n, k))
        return out

    def finish(self, req_ids: Iterable[str]) -> None:
        for req_id in req_ids:
            self._buffers.pop(req_id, None)
