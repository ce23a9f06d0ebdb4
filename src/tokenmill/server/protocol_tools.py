"""OpenAI tool calling in chat requests: the `tools` the model may call, `tool_choice`, and the
tool calls of earlier assistant turns. A forced choice ("required" or a named function) becomes
a JSON-Schema constraint on the output (see `forced_schema`); "auto" is parsed after generation
(tool_parsers.py)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, StrictBool, StrictStr

from tokenmill.errors import InvalidRequestError
from tokenmill.server.protocol_base import RequestModel

# OpenAI's rule for function names; it also keeps names safe inside prompts and grammars.
NAME_PATTERN = r"^[a-zA-Z0-9_.-]{1,64}$"


class FunctionDef(RequestModel):
    name: StrictStr = Field(pattern=NAME_PATTERN)
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="a JSON Schema the call's arguments conform to"
    )
    strict: StrictBool | None = None

    def schema(self) -> dict[str, Any]:
        """The arguments' schema; none given means any object (as OpenAI does)."""
        return self.parameters if self.parameters is not None else {"type": "object"}

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            out["description"] = self.description
        out["parameters"] = self.schema()
        return out


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


def resolve_tool_choice(
    tools: list[ToolDef] | None, choice: ToolChoice | None
) -> tuple[str, FunctionDef | None]:
    """("none" | "auto" | "required" | "named", the named function). 400 for a choice that
    names no listed tool, or a choice without tools."""
    if not tools:
        if choice is not None and choice != "none":
            raise InvalidRequestError("tool_choice needs tools", "tool_choice")
        return "none", None
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise InvalidRequestError("tool names must be unique", "tools")
    if choice is None:
        return "auto", None
    if isinstance(choice, NamedToolChoice):
        for t in tools:
            if t.function.name == choice.function.name:
                return "named", t.function
        raise InvalidRequestError(
            f"tool_choice names {choice.function.name!r}, which is not in tools", "tool_choice"
        )
    return choice, None


def forced_schema(
    tools: list[ToolDef], mode: str, named: FunctionDef | None, parallel: bool
) -> dict[str, Any]:
    """The JSON Schema a forced choice's output conforms to. Named: the function's arguments
    themselves. Required: an array of {"name", "parameters"} objects, one item per call (at
    most one without parallel calls); the grammar keeps the properties in this order, so a
    call's name always comes before its arguments (the stream relies on it)."""
    if mode == "named":
        assert named is not None
        return named.schema()
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": t.function.name}, "parameters": t.function.schema()},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    array: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
    if not parallel:
        array["maxItems"] = 1
    return array
