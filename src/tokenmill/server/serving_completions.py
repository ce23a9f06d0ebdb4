"""POST /v1/completions: prompts as a string, strings, token ids or lists of token ids."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import JSONResponse, Response

from tokenmill.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from tokenmill.server.errors import APIError
from tokenmill.server.protocol import CompletionRequest
from tokenmill.server.serving_common import (
    SSE_DONE,
    EventStreamResponse,
    ServerContext,
    final_outputs,
    merge_streams,
    safe_logprob,
    sse,
    top_entries,
    usage,
)


@dataclass
class _Prompt:
    text: str  # what echo prints
    token_ids: list[int]


@dataclass
class _Logprobs:
    """OpenAI's legacy logprobs object, built up token by token."""

    k: int
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add(self, token_id: int, lps: TokenLogprobs | None, text: str, offset: int) -> int:
        self.tokens.append(text)
        self.text_offset.append(offset)
        if lps is None:
            self.token_logprobs.append(None)
            self.top_logprobs.append(None)
        else:
            chosen = lps.get(token_id)
            self.token_logprobs.append(None if chosen is None else safe_logprob(chosen.logprob))
            top = {t: safe_logprob(v) for _, v, t in top_entries(lps, self.k)}
            if chosen is not None:
                top.setdefault(text, safe_logprob(chosen.logprob))
            self.top_logprobs.append(top)
        return offset + len(text)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }


class _Choice:
    """Turns one sample's cumulative outputs into increments (text, logprobs, finish)."""

    def __init__(self, index: int, prompt: _Prompt, req: CompletionRequest, ctx: ServerContext):
        self.index = index
        self.prompt = prompt
        self.req = req
        self.ctx = ctx
        self.num_text = 0
        self.num_tokens = 0
        self.offset = 0
        self.echoed = not req.echo
        self.done = False

    def _token_text(self, token_id: int, lps: TokenLogprobs | None) -> str:
        lp = None if lps is None else lps.get(token_id)
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        return self.ctx.tokenizer.id_to_piece_text(token_id)

    def delta(self, out: RequestOutput, c: CompletionOutput) -> dict[str, Any] | None:
        text = ""
        logprobs = None if self.req.logprobs is None else _Logprobs(self.req.logprobs)
        if not self.echoed and (c.token_ids or c.finish_reason):
            self.echoed = True
            text += self.prompt.text
            if logprobs is not None:
                plps = out.prompt_logprobs or []
                for i, tok in enumerate(self.prompt.token_ids):
                    lps = plps[i] if i < len(plps) else None
                    self.offset = logprobs.add(tok, lps, self._token_text(tok, lps), self.offset)
        text += c.text[self.num_text :]
        self.num_text = len(c.text)
        if logprobs is not None and c.logprobs is not None:
            for i in range(self.num_tokens, len(c.token_ids)):
                tok, lps = c.token_ids[i], c.logprobs[i] if i < len(c.logprobs) else None
                self.offset = logprobs.add(tok, lps, self._token_text(tok, lps), self.offset)
        self.num_tokens = len(c.token_ids)
        finish = None
        if c.finish_reason is not None and not self.done:
            self.done = True
            finish = c.finish_reason
        if not text and finish is None and (logprobs is None or not logprobs.tokens):
            return None
        return {
            "index": self.index,
            "text": text,
            "logprobs": None if logprobs is None else logprobs.as_dict(),
            "finish_reason": finish,
            "stop_reason": c.stop_reason if finish else None,
        }


async def create_completion(req: CompletionRequest, ctx: ServerContext) -> Response:
    model = ctx.check_model(req.model)
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of is not supported (it must be omitted or equal n)", "best_of")
    raw = req.prompts()
    ctx.engine.check_capacity(req.n, len(raw))  # before tokenizing every prompt
    prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
    params = req.sampling_params(req.max_tokens, req.logprobs, prompt_logprobs=prompt_logprobs)
    pre = ctx.preprocessor
    for p in raw:  # cheap checks on the event loop first: a 10 MB prompt is not tokenized
        if isinstance(p, str):
            ctx.check_prompt_bound(pre.min_tokens(p), "prompt")
        else:
            ctx.check_prompt(p, params, req.priority, "prompt")
    prompts = await pre.run(lambda: _tokenize(ctx, raw), "prompt")
    for p in prompts:
        ctx.check_prompt(p.token_ids, params, req.priority, "prompt")
    await ctx.check_structured_outputs(params)

    request_id = f"cmpl-{uuid.uuid4().hex}"
    streams = await ctx.add_all(
        [p.token_ids for p in prompts], params, request_id, req.priority, req.cache_salt
    )
    created = int(time.time())
    choices = [
        _Choice(i * req.n + j, p, req, ctx) for i, p in enumerate(prompts) for j in range(req.n)
    ]
    num_prompt = sum(len(p.token_ids) for p in prompts)
    head = {"id": request_id, "object": "text_completion", "created": created, "model": model}

    if req.stream:
        return EventStreamResponse(_stream(streams, choices, req, head, num_prompt), streams)

    outs = await final_outputs(streams)
    result = []
    num_completion = 0
    for i, out in enumerate(outs):
        for j, c in enumerate(out.outputs):
            d = choices[i * req.n + j].delta(out, c)
            assert d is not None
            result.append(d)
            num_completion += len(c.token_ids)
    result.sort(key=lambda d: d["index"])
    num_cached = sum(out.num_cached_tokens for out in outs)
    body = {**head, "choices": result, "usage": usage(num_prompt, num_completion, num_cached)}
    slos = [out.slo for out in outs if out.slo is not None]
    if slos:  # requests with an slo: whether the scheduler found them unable to meet it
        body["slo"] = {"hopeless": any(s["hopeless"] for s in slos)}
    return JSONResponse(body)


def _tokenize(ctx: ServerContext, raw: list[str | list[int]]) -> list[_Prompt]:
    """Token ids of the text prompts, text of the id prompts (for echo); runs in a worker."""
    tok = ctx.tokenizer
    prompts: list[_Prompt] = []
    for p in raw:
        if isinstance(p, str):
            ids = tok.encode(p)
            if not ids:
                raise APIError(400, "prompt must not be empty", "prompt")
            prompts.append(_Prompt(p, ids))
        else:
            prompts.append(_Prompt(tok.decode(p, skip_special_tokens=False), p))
    return prompts


async def _stream(
    streams: list, choices: list[_Choice], req: CompletionRequest, head: dict, num_prompt: int
) -> AsyncIterator[str]:
    num_completion = [0] * len(choices)
    num_cached = [0] * len(streams)
    async for i, out in merge_streams(streams):
        num_cached[i] = out.num_cached_tokens
        deltas = []
        for j, c in enumerate(out.outputs):
            idx = i * req.n + j
            d = choices[idx].delta(out, c)
            num_completion[idx] = len(c.token_ids)
            if d is not None:
                deltas.append(d)
        if deltas:
            yield sse({**head, "choices": deltas})
    if req.include_usage:
        body = usage(num_prompt, sum(num_completion), sum(num_cached))
        yield sse({**head, "choices": [], "usage": body})
    yield SSE_DONE
