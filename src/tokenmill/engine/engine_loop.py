"""The engine thread behind the async engine: it owns the LLMEngine and runs its steps.

The LLMEngine is not thread-safe, so every call into it happens on this thread. The event loop
sends commands (add, abort, call) through a thread-safe queue; the thread drains them between
steps and hands each step's outputs back to the loop in one `call_soon_threadsafe`. Outputs are
cumulative snapshots (copied here, since the engine keeps mutating its own objects), so a
consumer that falls behind only needs the newest one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from tokenmill.engine.engine import LLMEngine
from tokenmill.engine.request_stream import snapshot
from tokenmill.engine.stats import (
    EngineStats,
    RequestTiming,
    StatsListener,
    engine_stats,
    request_stats,
)
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.slo_params import SloHopelessError

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.5  # how long an idle engine thread sleeps on its command queue


class EngineDeadError(RuntimeError):
    """The engine loop stopped (a step raised, or the engine was shut down)."""


class EngineLoop:
    """Runs `engine` in a background thread, between the event loop's commands.

    `on_outputs` (a step's output snapshots) and `on_failure` (the error that stopped the thread)
    run on the event loop. `stats`, `error` and `heartbeat` are written here and read there.
    """

    def __init__(
        self,
        engine: LLMEngine,
        stats_listener: StatsListener,
        on_outputs: Callable[[list[RequestOutput]], None],
        on_failure: Callable[[BaseException], None],
    ) -> None:
        self.engine = engine
        self.stats_listener = stats_listener
        self.stats = EngineStats()
        self.error: BaseException | None = None
        self.heartbeat = time.monotonic()
        self._on_outputs = on_outputs
        self._on_failure = on_failure
        self._cmds: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._timings: dict[str, RequestTiming] = {}  # engine-thread side only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- the event loop's side ------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._stopping = False
        self.heartbeat = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="tokenmill-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops the thread, aborting whatever is still running, and waits for it (blocking)."""
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._cmds.put(("wake",))
        thread.join()
        self._thread = None

    def add(
        self,
        batch: Sequence[tuple[str, str | list[int]]],
        params: SamplingParams,
        priority: int,
        cache_salt: str | None,
        arrival: float,
        accepted: asyncio.Future[None],
    ) -> None:
        """Adds (request id, prompt) pairs, all or none; `accepted` gets the outcome."""
        self._cmds.put(("add", batch, params, priority, cache_salt, arrival, accepted))

    def abort(self, request_id: str) -> None:
        self._cmds.put(("abort", request_id))

    def call(self, fn: Callable[[LLMEngine], Any], fut: asyncio.Future[Any]) -> None:
        """Runs `fn(engine)` between steps; `fut` gets its result."""
        self._cmds.put(("call", fn, fut))

    # -- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stopping:
                self.heartbeat = time.monotonic()
                idle = not engine.has_unfinished_requests()
                self._process_commands(block=idle)
                if self._stopping:
                    break
                outputs: list[RequestOutput] | None = None
                if engine.has_unfinished_requests():
                    outputs = engine.step()
                    self.stats = dataclasses.replace(self.stats, num_steps=self.stats.num_steps + 1)
                    self._handle_outputs(outputs)
                self._update_stats()
                if outputs == [] and self.stats.num_running == 0:
                    self._process_commands(block=True, timeout=0.01)  # nothing schedulable
        except BaseException as e:  # a failed step leaves the engine in an unknown state
            logger.exception("engine loop failed")
            self.error = e
            self._post(self._on_failure, EngineDeadError(f"the engine loop failed: {e!r}"))
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
                if isinstance(e, SloHopelessError):
                    self.stats_listener.on_slo_rejected()
                self._post(_resolve, fut, None, e)
                return
            for rid, _ in batch:
                num_prompt = self.engine.num_prompt_tokens(rid)
                self._timings[rid] = RequestTiming(arrival, num_prompt, slo=params.slo)
                self.stats_listener.on_tokens(num_prompt, 0)
            self._post(_resolve, fut, None, None)
        elif kind == "abort":
            self._abort_on_engine(cmd[1])
        elif kind == "call":
            _, fn, fut = cmd
            try:
                result = fn(self.engine)
            except Exception as e:
                self._post(_resolve, fut, None, e)
            else:
                self._post(_resolve, fut, result, None)

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
            self._post(self._on_outputs, snapshots)

    def _update_stats(self) -> None:
        self.stats = engine_stats(
            self.engine.scheduler_stats(), self.stats.num_steps, self.engine.expert_cache_stats()
        )


def _resolve(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """On the event loop: settles a caller's future, unless it was cancelled meanwhile."""
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
