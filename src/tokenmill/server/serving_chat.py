"""POST /v1/chat/completions: messages rendered with the model's chat template; tool calls
(serving_tools) read from each choice's text."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import jinja2
from starlette.responses import JSONResponse, Response

from tokenmill.engine.async_engine import RequestStream
from tokenmill.errors import InvalidRequestError
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
from tokenmill.server.serving_tools import ToolCallStream, ToolPlan, plan_tools, template_inputs
from tokenmill.tools.choice import check_tool_schemas


def render_chat(
    ctx: ServerContext,
    messages: list[ChatMessage],
    add_generation_prompt: bool = True,
    check_text: Callable[[str], None] | None = None,
    tools: ToolPlan | None = None,
) -> list[int]:
    """The prompt token ids of a conversation, through the model's chat template; special-token
    text in the messages stays text (unless --allow-special-tokens-in-content).
    `check_text(rendered)` runs before tokenizing. Blocking: call it in a worker."""
    dicts, tool_list = template_inputs(
        tools or ToolPlan("none"),
        [m.as_template_dict() for m in messages],
        ctx.tokenizer.chat_template,
    )
    try:
        return ctx.tokenizer.encode_chat(
            dicts,
            add_generation_prompt,
            allow_special_in_content=ctx.preprocessor.allow_special_in_content,
            check_text=check_text,
            tools=tool_list,
        )
    except jinja2.TemplateError as e:  # templates raise on e.g. roles out of order
        raise APIError(400, f"messages could not be rendered by the chat template: {e}",
                       "messages") from e  # fmt: skip
    except ValueError as e:
        raise APIError(400, str(e), "messages") from e


async def _check_tool_schemas(ctx: ServerContext, req: ChatCompletionRequest) -> None:
    """400 naming the tool whose parameters schema is not one we can enforce (whatever the
    tool_choice), checked off the event loop; a forced choice compiles them again, against the
    vocabulary, later."""
    if any(t.function.parameters is not None for t in req.tools or []):
        await ctx.preprocessor.run(lambda: check_tool_schemas(req.tools), "tools")


def _tool_finish(finish: str | None) -> str | None:
    """OpenAI's reason for a turn that ends in calls; a cut-off one stays "length"."""
    return "tool_calls" if finish == "stop" else finish


class _Choice:
    def __init__(
        self, index: int, num_logprobs: int | None, ctx: ServerContext, plan: ToolPlan
    ) -> None:
        self.index = index
        self.k = num_logprobs
        self.ctx = ctx
        self.num_text = 0
        self.num_tokens = 0
        self.done = False
        self.tools = None if plan.mode == "none" else ToolCallStream(plan)

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
    plan = plan_tools(req, ctx.tool_call_parser)
    forced = plan.structured()
    if forced is not None and req.structured_spec() is not None:
        raise InvalidRequestError(
            "a forced tool_choice and response_format cannot both constrain the output",
            "tool_choice",
        )
    extra = {} if forced is None else {"structured_outputs": forced}
    params = req.sampling_params(max_tokens, num_logprobs, **extra)
    pre = ctx.preprocessor
    await _check_tool_schemas(ctx, req)

    def check_text(text: str) -> None:  # the cheap bound, before tokenizing
        ctx.check_prompt_bound(pre.min_tokens(text), "messages")

    prompt_ids = await pre.run(
        lambda: render_chat(ctx, req.messages, req.add_generation_prompt, check_text, plan),
        "messages",
    )
    ctx.check_prompt(prompt_ids, params, req.priority, "messages", param)
    await ctx.check_structured_outputs(params, "tools" if forced else req.structured_param())

    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    (stream,) = await ctx.add_all([prompt_ids], params, request_id, req.priority, req.cache_salt)
    head = {"id": request_id, "created": int(time.time()), "model": model}
    choices = [_Choice(j, num_logprobs, ctx, plan) for j in range(req.n)]
    if req.stream:
        chunks = _stream(stream, choices, req, head, len(prompt_ids))
        return EventStreamResponse(chunks, [stream])

    (out,) = await final_outputs([stream])
    result = []
    for choice, c in zip(choices, out.outputs, strict=True):
        text, entries, finish = choice.delta(c)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if choice.tools is not None:
            message["content"], calls = choice.tools.final(c.text)
            if calls:
                message["tool_calls"] = calls
                finish = _tool_finish(finish)
        result.append(
            {
                "index": choice.index,
                "message": message,
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
    if out.slo is not None:  # whether the scheduler found it unable to meet its slo
        body["slo"] = out.slo
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
                calls: list[dict[str, Any]] = []
                if choice.tools is not None:  # the content is what the calls leave
                    text, calls = choice.tools.step(c.text, c.finish_reason is not None)
                    if choice.tools.sent_args and finish is not None:
                        finish = _tool_finish(finish)
                if not text and not calls and not entries and finish is None:
                    continue
                delta: dict[str, Any] = {"content": text} if text or finish is None else {}
                if calls:
                    delta["tool_calls"] = calls
                deltas.append(
                    {
                        "index": choice.index,
                        "delta": delta,
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
