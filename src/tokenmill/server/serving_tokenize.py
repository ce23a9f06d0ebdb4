"""POST /tokenize and /detokenize: the work (and the JSON of a long answer) runs in a worker."""

from __future__ import annotations

from starlette.responses import Response

from tokenmill.server.errors import APIError
from tokenmill.server.preprocess import json_response
from tokenmill.server.protocol import DetokenizeRequest, TokenizeRequest
from tokenmill.server.serving_chat import render_chat
from tokenmill.server.serving_common import ServerContext

JSON = "application/json"


async def tokenize(req: TokenizeRequest, ctx: ServerContext) -> Response:
    ctx.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of prompt or messages", "prompt")
    pre = ctx.preprocessor
    messages, prompt = req.messages, req.prompt
    if messages is not None:

        def ids() -> list[int]:
            return render_chat(
                ctx,
                messages,
                req.add_generation_prompt,
                lambda text: pre.check_tokenize_limit(text, "messages"),
            )

        param = "messages"
    else:
        assert prompt is not None
        pre.check_tokenize_limit(prompt, "prompt")  # before tokenizing, on the event loop

        def ids() -> list[int]:
            return ctx.tokenizer.encode(prompt, add_special_tokens=req.add_special_tokens)

        param = "prompt"

    def work() -> Response:
        tokens = ids()
        tail = f'],"count":{len(tokens)},"max_model_len":{ctx.max_model_len}}}'
        return Response(b'{"tokens":[' + _join_ids(tokens) + tail.encode(), media_type=JSON)

    return await pre.run(work, param)


def _join_ids(ids: list[int]) -> bytes:
    """The JSON of a long id list, in slices: one C call over millions of ids (json.dumps) would
    hold the GIL, and stall the event loop, for a noticeable time."""
    step = 1 << 15
    parts = [",".join(map(str, ids[i : i + step])) for i in range(0, len(ids), step)]
    return ",".join(parts).encode()


async def detokenize(req: DetokenizeRequest, ctx: ServerContext) -> Response:
    ctx.check_model(req.model)

    def work() -> Response:
        bad = [t for t in req.tokens if not 0 <= t < ctx.vocab_size]
        if bad:
            raise APIError(400, f"tokens must be in [0, {ctx.vocab_size}); got {bad[:5]}", "tokens")
        text = ctx.tokenizer.decode(req.tokens, skip_special_tokens=False)
        return json_response({"prompt": text})

    return await ctx.preprocessor.run(work, "tokens")
