"""What the router reads from a request body: the text to route by and the predicted work.

The router never tokenizes. Its routing text is the prompt (a completion) or the messages
joined with their roles (a chat; the tools first, since templates render them first), so
requests that share a system prompt share a prefix of it; token-id prompts are spelled one
character per id, in a range text never reaches in practice. Predicted prompt tokens are
characters / `chars_per_token` for text and the id count for ids; predicted output tokens are
max_tokens (or `default_max_tokens` when absent) times n.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

_ID_BASE = 0x10000  # past the surrogates; a token id i is chr(_ID_BASE + i)


@dataclass(frozen=True)
class RouteInfo:
    text: str  # what the radix tree sees
    prompt_tokens: int  # predicted
    max_new_tokens: int  # predicted: every sample's max_tokens
    stream: bool
    chars_per_token: float  # characters of `text` per predicted prompt token


def route_info(
    path: str,
    body: dict[str, Any],
    *,
    chars_per_token: float = 4.0,
    default_max_tokens: int = 256,
) -> RouteInfo:
    text, per_token = _routing_text(path, body, chars_per_token)
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        max_tokens = default_max_tokens
    n = body.get("n")
    n = n if isinstance(n, int) and n >= 1 else 1
    prompt_tokens = max(1, round(len(text) / per_token))
    stream = body.get("stream") is True
    return RouteInfo(text, prompt_tokens, max_tokens * n, stream, per_token)


def _routing_text(path: str, body: dict[str, Any], chars_per_token: float) -> tuple[str, float]:
    if path.endswith("/chat/completions"):
        parts: list[str] = []
        if body.get("tools"):
            parts.append(json.dumps(body["tools"], sort_keys=True))
        for message in body.get("messages") or []:
            if isinstance(message, dict):
                parts.append(f"<{message.get('role')}>{_content_text(message.get('content'))}")
        return "\n".join(parts), chars_per_token
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt:
        if all(isinstance(i, int) for i in prompt):
            return _ids_text(prompt), 1.0
        # a batch: route by its first prompt (the batch goes to one worker)
        first = prompt[0]
        if isinstance(first, list):
            return _ids_text(first), 1.0
        prompt = first
    return (prompt if isinstance(prompt, str) else ""), chars_per_token


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: the text ones
        return "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def _ids_text(ids: list[Any]) -> str:
    return "".join(chr(_ID_BASE + i) for i in ids if isinstance(i, int) and 0 <= i < 0xF0000)
