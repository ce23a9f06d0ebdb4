"""The async engine: one background thread runs engine steps (engine/engine_loop.py); each
request streams its outputs through its own asyncio queue.

This is the asyncio side: it admits requests against the pending-sequence budget
(engine/capacity.py), hands them to the engine thread and routes the thread's outputs to their
streams.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from tokenmill.engine.capacity import QueueFullError, SeqBudget
from tokenmill.engine.engine import LLMEngine
from tokenmill.engine.engine_loop import EngineDeadError, EngineLoop
from tokenmill.engine.model_info import ModelInfo
from tokenmill.engine.request_stream import RequestStream
from tokenmill.engine.stats import EngineStats, RequestStats, StatsListener
from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.errors import CapacityError, InvalidRequestError
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

__all__ = ["AsyncLLMEngine", "CapacityError", "EngineDeadError", "EngineStats", "QueueFullError",
           "RequestStats", "RequestStream", "StatsListener"]  # fmt: skip


class AsyncLLMEngine:
    """Runs an LLMEngine in a background thread and serves many concurrent async requests.

    `max_pending_seqs` bounds the sequences (a request with n samples counts n) in the engine at
    once, running and waiting together; `add_request` raises QueueFullError beyond it while
    others are pending, and CapacityError for a request that alone needs more.
    """

    def __init__(
        self,
        engine: LLMEngine,
        *,
        max_pending_seqs: int | None = None,
        stats_listener: StatsListener | None = None,
        health_timeout_s: float = 120.0,
    ) -> None:
        self.engine = engine
        self.health_timeout_s = health_timeout_s
        self._budget = SeqBudget(max_pending_seqs)  # event-loop side only
        self._streams: dict[str, RequestStream] = {}  # event-loop side only
        self._futures: set[asyncio.Future[Any]] = set()  # event-loop side: awaiting the thread
        self._engine_thread = EngineLoop(
            engine, stats_listener or StatsListener(), self._dispatch, self._fail_all
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count()

    # -- what the engine serves (fixed; read on the event loop) --------------------------------
    @property
    def model_info(self) -> ModelInfo:
        return self.engine.model_info

    @property
    def tokenizer(self) -> Tokenizer:
        """Thread-safe: the server tokenizes in worker threads."""
        return self.engine.tokenizer

    def check_request(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        priority: int = 0,
        *,
        max_tokens_must_fit: bool = False,
    ) -> None:
        """LLMEngine.check_request, here and now: it reads only the fixed model info."""
        self.engine.check_request(
            prompt_ids, params, priority, max_tokens_must_fit=max_tokens_must_fit
        )

    def check_structured_outputs(self, params: SamplingParams) -> None:
        """LLMEngine.check_structured_outputs: blocks while the grammar compiles, so call it
        from a worker thread; raises InvalidRequestError for a spec that does not compile."""
        self.engine.check_structured_outputs([params])

    # -- the engine thread's state --------------------------------------------------------------
    @property
    def stats(self) -> EngineStats:
        """A snapshot the engine thread takes after each iteration."""
        return self._engine_thread.stats

    @property
    def stats_listener(self) -> StatsListener:
        return self._engine_thread.stats_listener

    @stats_listener.setter
    def stats_listener(self, listener: StatsListener) -> None:
        self._engine_thread.stats_listener = listener

    @property
    def error(self) -> BaseException | None:
        """What stopped the engine loop, if a step raised."""
        return self._engine_thread.error

    @property
    def max_pending_seqs(self) -> int | None:
        return self._budget.limit

    @property
    def num_pending_seqs(self) -> int:
        return self._budget.num_pending

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._engine_thread.started:
            return
        self._loop = asyncio.get_running_loop()
        self._engine_thread.start(self._loop)

    async def shutdown(self) -> None:
        """Stops the loop, aborting whatever is still running, and joins the thread."""
        if not self._engine_thread.started:
            return
        await asyncio.to_thread(self._engine_thread.stop)
        self._fail_all(EngineDeadError("the engine is shutting down"))

    @property
    def is_running(self) -> bool:
        return self._engine_thread.is_alive and self.error is None

    @property
    def is_healthy(self) -> bool:
        """Alive and stepping: the thread runs, no step failed, it looped recently, and every
        tensor-parallel worker runs."""
        since = time.monotonic() - self._engine_thread.heartbeat
        return (
            self.is_running and since < self.health_timeout_s and self.engine.health_error() is None
        )

    # -- requests -------------------------------------------------------------------------------
    def check_capacity(self, n: int, num_prompts: int = 1) -> None:
        """CapacityError when n samples of each of `num_prompts` prompts could never be pending
        at once, however long the client waits: retrying cannot help (unlike a full queue)."""
        self._budget.check_capacity(n, num_prompts)

    async def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> RequestStream:
        """Queues a request and returns its stream once the engine accepted it.

        Raises InvalidRequestError (bad input; CapacityError when it can never fit),
        QueueFullError or EngineDeadError.
        """
        request_id = request_id or f"req-{next(self._ids)}-{time.time_ns()}"
        (stream,) = await self.add_requests([prompt], params, [request_id], priority, cache_salt)
        return stream

    async def add_requests(
        self,
        prompts: Sequence[str | list[int]],
        params: SamplingParams,
        request_ids: Sequence[str],
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> list[RequestStream]:
        """Admits one request per prompt, all or none: a single capacity check covers all of
        their sequences, and the engine thread adds them in one go (if one fails, none stays).
        """
        if not self.is_running:
            raise EngineDeadError(
                "the engine loop is not running"
                + (f" (it failed: {self.error!r})" if self.error else "")
            )
        if len(set(request_ids)) != len(prompts):
            raise ValueError(f"need {len(prompts)} distinct request ids, got {request_ids}")
        self._budget.check_room(params.n, len(prompts))
        for rid in request_ids:
            if rid in self._streams:
                raise InvalidRequestError(f"request_id {rid!r} is already running", "request_id")
        # Registered before the first await: the capacity check and the reservation are atomic.
        streams = [RequestStream(self._abort, rid, params.n) for rid in request_ids]
        for stream in streams:
            self._streams[stream.request_id] = stream
            self._budget.add(stream.num_seqs)
        accepted: asyncio.Future[None] = self._new_future()
        batch = list(zip(request_ids, prompts, strict=True))
        self._engine_thread.add(batch, params, priority, cache_salt, time.monotonic(), accepted)
        try:
            await accepted
        except BaseException:
            for rid in request_ids:
                self._forget(rid)
            if not accepted.done() or accepted.cancelled():
                for rid in request_ids:  # cancelled while the engine thread was adding them
                    self._abort(rid)
            raise
        return streams

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yields cumulative outputs until the request finishes; aborts it if the consumer stops
        early (break, cancellation, client disconnect)."""
        stream = await self.add_request(prompt, params, request_id, priority, cache_salt)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def _abort(self, request_id: str) -> None:
        self._forget(request_id)
        self._engine_thread.abort(request_id)

    def _forget(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            self._budget.remove(stream.num_seqs)

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Runs `fn(engine)` on the engine thread between steps and returns its result."""
        if not self.is_running:
            raise EngineDeadError("the engine loop is not running")
        fut = self._new_future()
        self._engine_thread.call(fn, fut)
        return await fut

    def _new_future(self) -> asyncio.Future[Any]:
        assert self._loop is not None
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._futures.add(fut)
        fut.add_done_callback(self._futures.discard)
        return fut

    # -- event-loop side of the engine thread's results ----------------------------------------
    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted by its consumer meanwhile
            stream._put(out)
            if out.finished:
                self._forget(out.request_id)

    def _fail_all(self, error: BaseException) -> None:
        """The thread is gone: fail every stream and every caller still waiting on it."""
        for rid, stream in list(self._streams.items()):
            stream._put(error)
            self._forget(rid)
        for fut in list(self._futures):
            if not fut.done():
                fut.set_exception(error)
