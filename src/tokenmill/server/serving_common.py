"""What completions and chat share: the served model, prompt checks, stream merging, SSE."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from tokenmill.engine.async_engine import AsyncLLMEngine, RequestStream
from tokenmill.engine.model_info import ModelInfo
from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.errors import ContextLengthError, InvalidRequestError
from tokenmill.outputs import RequestOutput, TokenLogprobs
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.errors import APIError, error_body, to_api_error
from tokenmill.server.preprocess import Preprocessor


@dataclass
class ServerContext:
    """The engine plus what every handler needs to know about the served model."""

    engine: AsyncLLMEngine
    served_model_names: list[str]
    tokenizer: Tokenizer
    model: ModelInfo  # the engine's model and limits
    preprocessor: Preprocessor  # tokenizing and chat rendering, off the event loop
    tool_call_parser: str = "hermes"  # reads tool calls out of tool_choice="auto" output

    @classmethod
    def create(
        cls,
        engine: AsyncLLMEngine,
        served_model_names: Sequence[str] | None = None,
        tool_call_parser: str = "hermes",
        **preprocess: Any,
    ) -> ServerContext:
        """`preprocess`: Preprocessor options (timeout_s, num_workers)."""
        info = engine.model_info
        names = list(served_model_names or [info.name])
        allow = info.allow_special_tokens_in_content
        tok = engine.tokenizer
        pre = Preprocessor(tok, info.max_seq_len, allow_special_in_content=allow, **preprocess)
        return cls(engine, names, tok, info, pre, tool_call_parser)

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    @property
    def max_model_len(self) -> int:
        return self.model.max_seq_len

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    def check_model(self, model: str | None) -> str:
        """The name to answer with; 404 for a model this server does not serve. The model
        argument the server was started with (a path, a hub id) is accepted as an alias."""
        if model is None:
            return self.model_name
        if model in self.served_model_names:
            return model
        if model in self.model.aliases:
            return self.model_name
        raise APIError(
            404,
            f"The model `{model}` does not exist; this server serves "
            f"{', '.join(self.served_model_names)}",
            param="model",
            code="model_not_found",
        )

    def check_prompt_bound(self, min_tokens: int, prompt_param: str) -> None:
        """400 when a prompt's lower bound on tokens (the cheap check before tokenizing) already
        leaves no room for a generated token."""
        if min_tokens >= self.max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens, but the "
                f"prompt has at least {min_tokens} tokens (it must leave room for at least 1 "
                "generated token).",
                prompt_param,
                code="context_length_exceeded",
            )

    def check_prompt(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        priority: int,
        prompt_param: str,
        max_tokens_param: str = "max_tokens",
    ) -> None:
        """400 unless the engine would run this prompt with these params, max_tokens included
        (the OpenAI API refuses a max_tokens past the context instead of cutting it). Length
        errors name the request's own fields (messages, max_completion_tokens)."""
        try:
            self.engine.check_request(prompt_ids, params, priority, max_tokens_must_fit=True)
        except ContextLengthError as e:
            param = {"prompt": prompt_param, "max_tokens": max_tokens_param}.get(e.param, e.param)
            raise APIError(400, str(e), param, e.code) from None

    async def check_structured_outputs(
        self, params: SamplingParams, param: str = "structured_outputs"
    ) -> None:
        """400 unless the output constraint compiles: checked in a preprocessing worker before
        the request is queued (the compiled grammar stays cached for the engine). `param`: the
        request field that asked for it (the error names it)."""
        if params.structured_outputs is None:
            return
        check = self.engine.check_structured_outputs
        try:
            await self.preprocessor.run(lambda: check(params), param)
        except InvalidRequestError as e:
            msg = str(e).replace("structured_outputs.json", param, 1)
            raise APIError(400, msg, param, "invalid_structured_output") from None

    async def add_all(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        request_id: str,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> list[RequestStream]:
        """Adds one engine request per prompt, all of them or none."""
        ids = (
            [request_id]
            if len(prompts) == 1
            else [f"{request_id}-{i}" for i in range(len(prompts))]
        )
        return await self.engine.add_requests(prompts, params, ids, priority, cache_salt)


def safe_logprob(value: float) -> float:
    """JSON has no infinities: clamp like vLLM does."""
    if math.isnan(value):
        return -9999.0
    return max(value, -9999.0)


def top_entries(lps: TokenLogprobs, k: int) -> list[tuple[int, float, str]]:
    """The top-k (token id, logprob, text) of one position, best first."""
    ranked = sorted(
        ((lp.rank or 10**9, tok, lp) for tok, lp in lps.items() if lp.rank is not None),
        key=lambda x: x[0],
    )
    return [(tok, lp.logprob, lp.decoded_token or "") for _, tok, lp in ranked[:k]]


async def final_outputs(streams: list[RequestStream]) -> list[RequestOutput]:
    """Waits for every stream to finish; aborts all of them if this is cancelled or fails."""
    try:
        return list(await asyncio.gather(*(s.final() for s in streams)))
    finally:
        for s in streams:
            s.abort()


async def merge_streams(
    streams: list[RequestStream],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Yields (stream index, newest output) as any stream makes progress, until all finish."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    pending: dict[asyncio.Task[RequestOutput], int] = {}

    def arm(i: int) -> None:
        pending[asyncio.ensure_future(streams[i].__anext__())] = i

    try:
        for i in range(len(streams)):
            arm(i)
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                try:
                    out = task.result()
                except StopAsyncIteration:
                    continue
                yield i, out
                if not out.finished:
                    arm(i)
    finally:
        for task in pending:
            task.cancel()
        for s in streams:
            s.abort()


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class EventStreamResponse(StreamingResponse):
    """Server-sent events. Always closes its generator on the way out, so the request behind it
    is aborted at once when the client goes away (the generator's `finally` aborts it)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], streams: Sequence[RequestStream] = ()) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(_error_events(content), headers=headers)
        self.streams = list(streams)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for s in self.streams:  # also when the generator never started
                s.abort()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


async def _error_events(content: AsyncIterator[str]) -> AsyncIterator[str]:
    """A failure after the 200 went out (the engine died) is reported in-band, then [DONE]."""
    try:
        async for chunk in content:
            yield chunk
    except Exception as exc:
        e = to_api_error(exc)
        yield sse(error_body(e.status, e.message, e.param, e.code))
        yield SSE_DONE
    finally:
        aclose = getattr(content, "aclose", None)
        if aclose is not None:
            await aclose()


def usage(num_prompt: int, num_completion: int, num_cached: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; `num_cached` prompt tokens were served from the prefix cache."""
    return {
        "prompt_tokens": num_prompt,
        "completion_tokens": num_completion,
        "total_tokens": num_prompt + num_completion,
        "prompt_tokens_details": {"cached_tokens": num_cached},
    }
