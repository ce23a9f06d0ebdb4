"""The tools a chat request offers and its tool_choice, in the shapes both front ends share.

The server validates OpenAI JSON with its pydantic models (`server/protocol_tools.py`); the
offline API builds `Tool`s from the same JSON here. Both satisfy `ToolLike`, which is all the
planning below reads. A forced choice ("required" or a named function) becomes a JSON-Schema
constraint on the output (`forced_schema`); "auto" is parsed after generation (parsers.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

from tokenmill.errors import InvalidRequestError
from tokenmill.structured import check_json_schema

# OpenAI's rule for function names; it also keeps names safe inside prompts and grammars.
NAME_PATTERN = r"^[a-zA-Z0-9_.-]{1,64}$"


class FunctionLike(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def parameters(self) -> dict[str, Any] | None: ...

    def schema(self) -> dict[str, Any]: ...

    def as_json(self) -> dict[str, Any]: ...


class ToolLike(Protocol):
    @property
    def function(self) -> FunctionLike: ...

    def as_json(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Function:
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None

    def schema(self) -> dict[str, Any]:
        """The arguments' schema; none given means any object (as OpenAI does)."""
        return self.parameters if self.parameters is not None else {"type": "object"}

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            out["description"] = self.description
        out["parameters"] = self.schema()
        return out


@dataclass(frozen=True)
class Tool:
    function: Function

    def as_json(self) -> dict[str, Any]:
        return {"type": "function", "function": self.function.as_json()}

    @staticmethod
    def from_json(obj: Any, i: int) -> Tool:
        """An OpenAI `tools[i]` entry: {"type": "function", "function": {"name", ...}}."""
        param = f"tools[{i}]"
        if not isinstance(obj, dict) or obj.get("type") != "function":
            raise InvalidRequestError(f'{param} must be {{"type": "function", ...}}', "tools")
        fn = obj.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not re.match(NAME_PATTERN, name):
            raise InvalidRequestError(
                f"{param}.function.name must match {NAME_PATTERN}, got {name!r}", "tools"
            )
        desc, params = fn.get("description"), fn.get("parameters")
        if desc is not None and not isinstance(desc, str):
            raise InvalidRequestError(f"{param}.function.description must be a string", "tools")
        if params is not None and not isinstance(params, dict):
            raise InvalidRequestError(f"{param}.function.parameters must be an object", "tools")
        return Tool(Function(name, desc, params))


def _named_choice(choice: Any) -> str | None:
    """The function a named tool_choice names (a pydantic model or OpenAI JSON), else None."""
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise InvalidRequestError(
                'tool_choice must be "none", "auto", "required" or '
                '{"type": "function", "function": {"name": ...}}',
                "tool_choice",
            )
        return name
    fn = getattr(choice, "function", None)
    return getattr(fn, "name", None) if fn is not None else None


def resolve_tool_choice(
    tools: list[ToolLike] | None, choice: Any
) -> tuple[str, FunctionLike | None]:
    """("none" | "auto" | "required" | "named", the named function). InvalidRequestError for
    a choice that names no listed tool, or a choice without tools."""
    if not tools:
        if choice is not None and choice != "none":
            raise InvalidRequestError("tool_choice needs tools", "tool_choice")
        return "none", None
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise InvalidRequestError("tool names must be unique", "tools")
    if choice is None:
        return "auto", None
    named = None if isinstance(choice, str) else _named_choice(choice)
    if named is not None:
        for t in tools:
            if t.function.name == named:
                return "named", t.function
        raise InvalidRequestError(
            f"tool_choice names {named!r}, which is not in tools", "tool_choice"
        )
    if choice not in ("none", "auto", "required"):
        raise InvalidRequestError(
            f'tool_choice must be "none", "auto", "required" or a named function, got {choice!r}',
            "tool_choice",
        )
    return choice, None


def check_tool_schemas(tools: list[ToolLike] | None) -> None:
    """InvalidRequestError naming the first tool whose parameters schema is not one we can
    enforce (whatever the tool_choice: a forced one compiles them against the vocabulary)."""
    for i, t in enumerate(tools or []):
        params = getattr(t.function, "parameters", None)
        if params is not None:
            check_json_schema(params, f"tools[{i}].function.parameters")


def forced_schema(
    tools: list[ToolLike], mode: str, named: FunctionLike | None, parallel: bool
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
