"""The shapes of the server's answers, for the OpenAPI document (openapi.py). The serving
modules build these bodies as plain dicts; the schema fuzz test checks that they match."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Doc):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Doc):
    """OpenAI's error shape, for every status >= 400."""

    error: ErrorDetail


class PromptTokensDetails(_Doc):
    cached_tokens: int


class Usage(_Doc):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(_Doc):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Doc):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None
    stop_reason: int | str | None


class SloOutcome(_Doc):
    """Present when the request carried an `slo`."""

    hopeless: bool = Field(
        description="the slo scheduling policy found it could no longer meet its SLO and served "
        "it after the requests that could"
    )


class CompletionResponse(_Doc):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    slo: SloOutcome | None = None


class TopLogprob(_Doc):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Doc):
    content: list[ChatTokenLogprob]


class AssistantMessage(_Doc):
    role: Literal["assistant"]
    content: str


class ChatChoice(_Doc):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None
    stop_reason: int | str | None


class ChatCompletionResponse(_Doc):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    slo: SloOutcome | None = None


class CompletionChunk(_Doc):
    """One server-sent event of a completion stream; the last one (include_usage) has no
    choices and the usage."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatDelta(_Doc):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Doc):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(_Doc):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(_Doc):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    max_model_len: int


class ModelList(_Doc):
    object: Literal["list"]
    data: list[ModelCard]


class HealthResponse(_Doc):
    status: Literal["ok"]


class VersionResponse(_Doc):
    version: str


class TokenizeResponse(_Doc):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(_Doc):
    prompt: str


DOCUMENTED: list[type[BaseModel]] = [
    ErrorResponse,
    CompletionResponse,
    ChatCompletionResponse,
    CompletionChunk,
    ChatCompletionChunk,
    ModelList,
    HealthResponse,
    VersionResponse,
    TokenizeResponse,
    DetokenizeResponse,
]
