"""OpenAI tool calling in chat requests: the `tools` the model may call, `tool_choice`, and the
tool calls of earlier assistant turns, validated at the HTTP edge. What they mean (the choice,
the forced constraint, the parsers) is in `tokenmill.tools`, shared with the offline API."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, StrictBool, StrictStr

from tokenmill.server.protocol_base import RequestModel
from tokenmill.tools.choice import NAME_PATTERN, Function


class FunctionDef(RequestModel):
    name: StrictStr = Field(pattern=NAME_PATTERN)
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="a JSON Schema the call's arguments conform to"
    )
    strict: StrictBool | None = None

    def schema(self) -> dict[str, Any]:
        return self._spec().schema()

    def as_json(self) -> dict[str, Any]:
        return self._spec().as_json()

    def _spec(self) -> Function:  # the offline API's definition: one place for both
        return Function(self.name, self.description, self.parameters)


class ToolDef(RequestModel):
    type: Literal["function"]
    function: FunctionDef

    def as_json(self) -> dict[str, Any]:
        return {"type": "function", "function": self.function.as_json()}


class NamedFunction(RequestModel):
    name: StrictStr


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class CalledFunction(RequestModel):
    name: StrictStr
    arguments: StrictStr = Field(description="the arguments as a JSON string")


class ToolCallIn(RequestModel):
    """A call of an earlier assistant turn, sent back with the conversation."""

    id: StrictStr
    type: Literal["function"] = "function"
    function: CalledFunction

    def as_template_dict(self) -> dict[str, Any]:
        # Templates (transformers' convention) read the arguments as a mapping; text that is
        # not a JSON object stays text.
        try:
            args: Any = json.loads(self.function.arguments)
        except ValueError:
            args = self.function.arguments
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.function.name, "arguments": args},
        }
