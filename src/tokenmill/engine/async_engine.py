"""The async engine: one background thread runs engine steps; each request streams its outputs
through its own asyncio queue.

The LLMEngine is not thread-safe, so every call into it happens on the engine thread. The event
loop sends commands (add, abort) through a thread-safe queue; the engine thread drains them
between steps and hands each step's outputs back to the loop in one `call_soon_threadsafe`.
Outputs are cumulative snapshots (copied on the engine thread, which keeps mutating its own
objects), so a consumer that falls behind only needs the newest one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from tokenmill.engine.engine import LLMEngine
from tokenmill.engine.request_stream import RequestStream, snapshot
from tokenmill.engine.stats import (
    EngineStats,
    RequestStats,
    RequestTiming,
    StatsListener,
    engine_stats,
    request_stats,
)
from tokenmill.errors import CapacityError, InvalidRequestError
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.5  # how long an idle engine thread sleeps on its command queue


class EngineDeadError(RuntimeError):
    """The engine loop stopped (a step raised, or the engine was shut down)."""


class QueueFullError(RuntimeError):
    """Too many requests are already waiting; the client should retry later."""


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
        self.max_pending_seqs = max_pending_seqs
        self.stats_listener = stats_listener or StatsListener()
        self.health_timeout_s = health_timeout_s
        self.stats = EngineStats()
        self.error: BaseException | None = None
        self._cmds: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # event-loop side only
        self._num_pending_seqs = 0  # event-loop side only
        self._futures: set[asyncio.Future[Any]] = set()  # event-loop side: awaiting the thread
        self._timings: dict[str, RequestTiming] = {}  # engine-thread side only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._heartbeat = time.monotonic()
        self._ids = itertools.count()

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._heartbeat = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="tokenmill-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        """Stops the loop, aborting whatever is still running, and joins the thread."""
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._cmds.put(("wake",))
        await asyncio.to_thread(thread.join)
        self._thread = None
        self._fail_all(EngineDeadError("the engine is shutting down"))

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def is_healthy(self) -> bool:
        """Alive and stepping: the thread runs, no step failed, and it looped recently."""
        return self.is_running and time.monotonic() - self._heartbeat < self.health_timeout_s

    @property
    def num_pending_seqs(self) -> int:
        return self._num_pending_seqs

    # -- requests -------------------------------------------------------------------------------
    def check_capacity(self, n: int, num_prompts: int = 1) -> None:
        """CapacityError when n samples of each of `num_prompts` prompts could never be pending
        at once, however long the client waits: retrying cannot help (unlike a full queue)."""
        limit = self.max_pending_seqs
        if limit is not None and n * num_prompts > limit:
            raise CapacityError(
                f"the request needs {n * num_prompts} sequences at once (n={n} x {num_prompts} "
                f"prompt(s)), but this server holds at most {limit} (running and queued "
                "together); lower n or send fewer prompts",
                "n",
            )

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
        self.check_capacity(params.n, len(prompts))
        num_seqs = params.n * len(prompts)
        limit = self.max_pending_seqs
        if limit is not None and self._num_pending_seqs + num_seqs > limit:
            raise QueueFullError(
                f"the server is at capacity ({self._num_pending_seqs} sequences pending, "
                f"limit {limit}; this request needs {num_seqs}); retry later"
            )
        for rid in request_ids:
            if rid in self._streams:
                raise InvalidRequestError(f"request_id {rid!r} is already running", "request_id")
        assert self._loop is not None
        # Registered before the first await: the capacity check and the reservation are atomic.
        streams = [RequestStream(self._abort, rid, params.n) for rid in request_ids]
        for stream in streams:
            self._streams[stream.request_id] = stream
            self._num_pending_seqs += stream.num_seqs
        accepted: asyncio.Future[None] = self._new_future()
        batch = list(zip(request_ids, prompts, strict=True))
        self._cmds.put(("add", batch, params, priority, cache_salt, time.monotonic(), accepted))
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
        self._cmds.put(("abort", request_id))

    def _forget(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            self._num_pending_seqs -= stream.num_seqs

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Runs `fn(engine)` on the engine thread between steps and returns its result."""
        if not self.is_running:
            raise EngineDeadError("the engine loop is not running")
        fut = self._new_future()
        self._cmds.put(("call", fn, fut))
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

    def _resolve(self, fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    # -- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stopping:
                self._heartbeat = time.monotonic()
                idle = not engine.has_unfinished_requests()
                self._process_commands(block=idle)
                if self._stopping:
                    break
                if engine.has_unfinished_requests():
                    outputs = engine.step()
                    self.stats = dataclasses.replace(self.stats, num_steps=self.stats.num_steps + 1)
                    self._handle_outputs(outputs)
                    if not outputs and engine.scheduler.num_running == 0:
                        self._process_commands(block=True, timeout=0.01)  # nothing schedulable
                self._update_stats()
        except BaseException as e:  # a failed step leaves the engine in an unknown state
            logger.exception("engine loop failed")
            self.error = e
            self._post(self._fail_all, EngineDeadError(f"the engine loop failed: {e!r}"))
            return
        # Shutting down: abort what is left so the engine ends clean.
        self._process_commands(block=False)
        for rid in list(self._timings):
            self._abort_on_engine(rid)
        self._update_stats()

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            self._loop.call_soon_threadsafe(fn, *args)

    def _process_commands(self, block: bool, timeout: float = _IDLE_WAIT_S) -> None:
        try:
            cmd = self._cmds.get(timeout=timeout) if block else self._cmds.get_nowait()
        except queue.Empty:
            return
        while True:
            self._execute(cmd)
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return

    def _execute(self, cmd: tuple[Any, ...]) -> None:
        kind = cmd[0]
        if kind == "add":
            _, batch, params, priority, cache_salt, arrival, fut = cmd
            if fut.cancelled():
                return
            added: list[str] = []
            try:
                for rid, prompt in batch:
                    added.append(rid)
                    self.engine.add_request(prompt, params, rid, priority, cache_salt)
            except Exception as e:
                for rid in added:  # drop every request of the batch, and any partial state
                    self.engine.abort_request(rid)
                self._post(self._resolve, fut, None, e)
                return
            for rid, _ in batch:
                num_prompt = len(self.engine.outputs.states[rid].prompt_token_ids)
                self._timings[rid] = RequestTiming(arrival, num_prompt)
                self.stats_listener.on_tokens(num_prompt, 0)
            self._post(self._resolve, fut, None, None)
        elif kind == "abort":
            self._abort_on_engine(cmd[1])
        elif kind == "call":
            _, fn, fut = cmd
            try:
                result = fn(self.engine)
            except Exception as e:
                self._post(self._resolve, fut, None, e)
            else:
                self._post(self._resolve, fut, result, None)

    def _abort_on_engine(self, rid: str) -> None:
        out = self.engine.abort_request(rid)
        if out is not None:
            self._handle_outputs([out])

    def _handle_outputs(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        snapshots = []
        num_new_tokens = 0
        listener = self.stats_listener
        for out in outputs:
            timing = self._timings.get(out.request_id)
            if timing is not None:
                num_tokens = sum(len(c.token_ids) for c in out.outputs)
                num_new_tokens += num_tokens - timing.num_generated
                timing.num_generated = num_tokens
                if timing.first_token is None and num_tokens:
                    timing.first_token = now
                    listener.on_first_token(now - timing.arrival)
                if out.finished:
                    del self._timings[out.request_id]
                    listener.on_finished(request_stats(out, timing, now))
            snapshots.append(snapshot(out))
        if num_new_tokens:
            listener.on_tokens(0, num_new_tokens)
        if snapshots:
            self._post(self._dispatch, snapshots)

    def _update_stats(self) -> None:
        self.stats = engine_stats(self.engine, self.stats.num_steps)
