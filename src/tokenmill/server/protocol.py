"""OpenAI-compatible request models (pydantic, at the HTTP edge only) and their translation to
SamplingParams. Responses are built as plain dicts by the serving modules (their documented
shapes are in responses.py).

The models live in protocol_base (the base model and shared field types), protocol_sampling
(the sampling fields of completions and chat), protocol_completions, protocol_chat and
protocol_tokenize; this module gathers them.

The value ranges come from sampling_params.py, so the OpenAPI document states the limits the
server enforces. Limits that depend on the served model (vocabulary, context length, queue) are
marked with `x-limit` in those modules and filled in by openapi.py. Union-typed fields keep a
`before` validator that names the problem plainly; their annotations only shape the schema.
"""

from __future__ import annotations

from tokenmill.server.protocol_base import TokenCount, TokenId
from tokenmill.server.protocol_chat import ChatCompletionRequest, ChatMessage, TextPart
from tokenmill.server.protocol_completions import CompletionRequest
from tokenmill.server.protocol_sampling import MAX_N, StreamOptions
from tokenmill.server.protocol_tokenize import DetokenizeRequest, TokenizeRequest

__all__ = [
    "MAX_N",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "DetokenizeRequest",
    "StreamOptions",
    "TextPart",
    "TokenCount",
    "TokenId",
    "TokenizeRequest",
]
