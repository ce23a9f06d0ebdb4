"""The /tokenize and /detokenize requests."""

from __future__ import annotations

from pydantic import ConfigDict, StrictBool, StrictStr

from tokenmill.server.protocol_base import RequestModel, TokenId
from tokenmill.server.protocol_chat import ChatMessage


class TokenizeRequest(RequestModel):
    """Exactly one of `prompt` (text) or `messages` (a chat, through the template)."""

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
                {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
            ]
        }
    )

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True


class DetokenizeRequest(RequestModel):
    model: StrictStr | None = None
    tokens: list[TokenId]
