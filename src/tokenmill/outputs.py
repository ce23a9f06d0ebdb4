"""User-facing results, shaped like vLLM's so existing scripts port over."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = most likely
    decoded_token: str | None = None


# One entry per token: token id -> Logprob (the chosen token plus the top-k).
TokenLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    # LLM.chat with tools: the text without its tool calls (None when only calls), and the calls
    # read out of it, OpenAI-shaped ({"id", "type": "function", "function": {"name",
    # "arguments"}}); both None without tools.
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[TokenLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    # Requests with an slo: {"hopeless": bool} -- true when the slo policy found it could no
    # longer meet its targets and served it after those that could.
    slo: dict[str, bool] | None = None
