"""The /v1/chat/completions request and its messages (text content only, tool calls)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

from tokenmill.errors import InvalidRequestError, check_unicode
from tokenmill.sampling_params import MAX_LOGPROBS, StructuredOutputsParams
from tokenmill.server.protocol_base import RequestModel, TokenCount
from tokenmill.server.protocol_sampling import STREAM_OPTIONS_NEED_STREAM, SamplingFields, needs
from tokenmill.server.protocol_structured import ResponseFormat
from tokenmill.server.protocol_tools import ToolCallIn, ToolChoice, ToolDef

_TOP_LOGPROBS_NEED_LOGPROBS = needs("top_logprobs", "integer", "logprobs")


class TextPart(RequestModel):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCallIn] | None = Field(None, description="an assistant turn's calls")
    tool_call_id: StrictStr | None = Field(None, description="the call a tool message answers")

    @field_validator("content", mode="before")
    @classmethod
    def _check_content(cls, v: Any) -> Any:
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, list):
            for part in v:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"only text content parts are supported, got type {kind!r}")
                check_unicode(part["text"])  # here, not in TextPart: names the field plainly
            return v
        raise ValueError("must be a string or a list of text parts")

    def as_template_dict(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "\n".join(p.text for p in content)
        msg: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name is not None:
            msg["name"] = self.name
        if self.tool_calls:
            msg["tool_calls"] = [c.as_template_dict() for c in self.tool_calls]
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        return msg


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(
        json_schema_extra={"allOf": [STREAM_OPTIONS_NEED_STREAM, _TOP_LOGPROBS_NEED_LOGPROBS]}
    )

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Annotated[TokenCount, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[TokenCount, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: Annotated[list[ToolDef], Field(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: StrictBool = True
    add_generation_prompt: StrictBool = True
    response_format: ResponseFormat | None = None

    def structured_spec(self) -> StructuredOutputsParams | None:
        fmt = None if self.response_format is None else self.response_format.params()
        own = super().structured_spec()
        if fmt is not None and own is not None:
            raise InvalidRequestError(
                "response_format and structured_outputs cannot both constrain the output",
                "response_format",
            )
        return fmt or own

    def structured_param(self) -> str:
        """The field that constrains the output, for error messages."""
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return "structured_outputs"
        return (
            "response_format.json_schema.schema" if fmt.type == "json_schema" else "response_format"
        )

    def num_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError(
                "top_logprobs is only allowed when logprobs is true", "top_logprobs"
            )
        if not self.logprobs:
            return None
        return self.top_logprobs or 0
