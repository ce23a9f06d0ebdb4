"""One request's stream of outputs on the event loop, fed by the engine thread."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

from tokenmill.outputs import RequestOutput


def snapshot(out: RequestOutput) -> RequestOutput:
    """A copy the event loop may read while the engine thread keeps appending to the original."""
    outputs = [
        dataclasses.replace(
            c,
            token_ids=list(c.token_ids),
            logprobs=None if c.logprobs is None else list(c.logprobs),
        )
        for c in out.outputs
    ]
    prompt_lps = None if out.prompt_logprobs is None else list(out.prompt_logprobs)
    return dataclasses.replace(
        out, outputs=outputs, prompt_logprobs=prompt_lps, metrics=dict(out.metrics)
    )


class RequestStream:
    """The outputs of one request, newest cumulative snapshot first-come. Iterate it with
    `async for`; `abort()` (idempotent) cancels the request if it has not finished."""

    def __init__(self, abort: Callable[[str], None], request_id: str, num_seqs: int) -> None:
        self.request_id = request_id
        self.num_seqs = num_seqs
        self.finished = False
        self._abort = abort  # the engine's: safe to call from the event loop
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._closed = False

    def _put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished or self._closed:
            raise StopAsyncIteration
        item = await self._queue.get()
        while not isinstance(item, BaseException) and not self._queue.empty():
            item = self._queue.get_nowait()  # cumulative: only the newest matters
        if isinstance(item, BaseException):
            self._closed = True
            raise item
        if item.finished:
            self.finished = True
        return item

    async def final(self) -> RequestOutput:
        """Waits for the request to finish and returns its last output."""
        last = None
        async for out in self:
            last = out
        assert last is not None and last.finished
        return last

    def abort(self) -> None:
        """Cancels the request (no-op once it finished). Safe to call from a `finally`."""
        if not self.finished and not self._closed:
            self._closed = True
            self._abort(self.request_id)
