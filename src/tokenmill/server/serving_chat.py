"""POST /v1/chat/completions: messages rendered with the model's chat template."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import jinja2
from starlette.responses import JSONResponse, Response

from tokenmill.engine.async_engine import RequestStream
from tokenmill.outputs import CompletionOutput, TokenLogprobs
from tokenmill.server.errors import APIError
from tokenmill.server.protocol import ChatCompletionRequest, ChatMessage
from tokenmill.server.serving_common import (
    SSE_DONE,
    EventStreamResponse,
    ServerContext,
    final_outputs,
    safe_logprob,
    sse,
    top_entries,
    usage,
)


def render_chat(
    ctx: ServerContext,
    messages: list[ChatMessage],
    add_generation_prompt: bool = True,
    check_text: Callable[[str], None] | None = None,
) -> list[int]:
    """The prompt token ids of a conversation, through the model's chat template; special-token
    text in the messages stays text (unless --allow-special-tokens-in-content).
    `check_text(rendered)` runs before tokenizing. Blocking: call it in a worker."""
    try:
        return ctx.tokenizer.encode_chat(
            [m.as_template_dict() for m in messages],
            add_generation_prompt,
            allow_special_in_content=ctx.preprocessor.allow_special_in_content,
            check_text=check_text,
        )
    except jinja2.TemplateError as e:  # templates raise on e.g. roles out of order
        raise APIError(400, f"messages could not be rendered by the chat template: {e}",
                       "messages") from e  # fmt: skip
    except ValueError as e:
        raise APIError(400, str(e), "messages") from e


class _Choice:
    def __init__(self, index: int, num_logprobs: int | None, ctx: ServerContext) -> None:
        self.index = index
        self.k = num_logprobs
        self.ctx = ctx
        self.num_text = 0
        self.num_tokens = 0
        self.done = False

    def _entry(self, token_id: int, lps: TokenLogprobs | None) -> dict[str, Any]:
        lp = None if lps is None else lps.get(token_id)
        text = lp.decoded_token if lp is not None and lp.decoded_token is not None else None
        if text is None:
            text = self.ctx.tokenizer.id_to_piece_text(token_id)
        top = []
        if lps is not None and self.k:
            top = [
                {"token": t, "logprob": safe_logprob(v), "bytes": list(t.encode("utf-8"))}
                for _, v, t in top_entries(lps, self.k)
            ]
        return {
            "token": text,
            "logprob": safe_logprob(lp.logprob) if lp is not None else -9999.0,
            "bytes": list(text.encode("utf-8")),
            "top_logprobs": top,
        }

    def delta(self, c: CompletionOutput) -> tuple[str, list[dict[str, Any]] | None, str | None]:
        """(new text, new logprob entries or None, finish reason once)."""
        text = c.text[self.num_text :]
        self.num_text = len(c.text)
        entries = None
        if self.k is not None:
            entries = []
            lps_list = c.logprobs or []
            for i in range(self.num_tokens, len(c.token_ids)):
                lps = lps_list[i] if i < len(lps_list) else None
                entries.append(self._entry(c.token_ids[i], lps))
        self.num_tokens = len(c.token_ids)
        finish = None
        if c.finish_reason is not None and not self.done:
            self.done = True
            finish = c.finish_reason
        return text, entries, finish


async def create_chat_completion(req: ChatCompletionRequest, ctx: ServerContext) -> Response:
    model = ctx.check_model(req.model)
    max_tokens = (
        req.max_completion_tokens if req.max_completion_tokens is not None else (req.max_tokens)
    )
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    num_logprobs = req.num_logprobs()
    params = req.sampling_params(max_tokens, num_logprobs)
    pre = ctx.preprocessor

    def check_text(text: str) -> None:  # the cheap bound, before tokenizing
        ctx.check_prompt_bound(pre.min_tokens(text), "messages")

    prompt_ids = await pre.run(
        lambda: render_chat(ctx, req.messages, req.add_generation_prompt, check_text),
        "messages",
    )
    ctx.check_prompt(prompt_ids, params, req.priority, "messages", param)
    await ctx.check_structured_outputs(params, req.structured_param())

    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    (stream,) = await ctx.add_all([prompt_ids], params, request_id, req.priority, req.cache_salt)
    head = {"id": request_id, "created": int(time.time()), "model": model}
    choices = [_Choice(j, num_logprobs, ctx) for j in range(req.n)]
    if req.stream:
        chunks = _stream(stream, choices, req, head, len(prompt_ids))
        return EventStreamResponse(chunks, [stream])

    (out,) = await final_outputs([stream])
    result = []
    for choice, c in zip(choices, out.outputs, strict=True):
        text, entries, finish = choice.delta(c)
        result.append(
            {
                "index": choice.index,
                "message": {"role": "assistant", "content": text},
                "logprobs": None if entries is None else {"content": entries},
                "finish_reason": finish,
                "stop_reason": c.stop_reason,
            }
        )
    num_completion = sum(len(c.token_ids) for c in out.outputs)
    body = {
        **head,
        "object": "chat.completion",
        "choices": result,
        "usage": usage(len(prompt_ids), num_completion, out.num_cached_tokens),
    }
    return JSONResponse(body)


async def _stream(
    stream: RequestStream,
    choices: list[_Choice],
    req: ChatCompletionRequest,
    head: dict[str, Any],
    num_prompt: int,
) -> AsyncIterator[str]:
    head = {**head, "object": "chat.completion.chunk"}
    try:
        yield sse(
            {
                **head,
                "choices": [
                    {
                        "index": ch.index,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    for ch in choices
                ],
            }
        )
        num_completion = num_cached = 0
        async for out in stream:
            num_cached = out.num_cached_tokens
            deltas = []
            for choice, c in zip(choices, out.outputs, strict=True):
                text, entries, finish = choice.delta(c)
                if not text and not entries and finish is None:
                    continue
                deltas.append(
                    {
                        "index": choice.index,
                        "delta": {"content": text} if text or finish is None else {},
                        "logprobs": None if entries is None else {"content": entries},
                        "finish_reason": finish,
                    }
                )
            num_completion = sum(len(c.token_ids) for c in out.outputs)
            if deltas:
                yield sse({**head, "choices": deltas})
        if req.include_usage:
            body = usage(num_prompt, num_completion, num_cached)
            yield sse({**head, "choices": [], "usage": body})
        yield SSE_DONE
    finally:
        stream.abort()
