"""Tool calls out of generated text: the `--tool-call-parser`s for tool_choice "auto", and the
reader of a forced choice's grammar-shaped output.

A parser turns the whole text into (content, calls). Text it cannot read as calls (bad JSON, a
name the request did not list, a call without arguments) is plain content, never an error. For
streaming, `content_end(text)` says how much of a partial text is surely content: everything
before anything that may yet become a call.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # a JSON text


class ToolParser(Protocol):
    def parse(self, text: str, names: Collection[str]) -> tuple[str | None, list[ParsedCall]]:
        """(content or None when there is none, the calls in order)."""
        ...

    def content_end(self, text: str) -> int:
        """A length n such that text[:n] is content whatever follows."""
        ...


def _call_of(obj: object, names: Collection[str]) -> ParsedCall | None:
    """A call from a decoded {"name", "arguments" | "parameters"} object, or None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters"))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict) or obj["name"] not in names:
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _content(text: str) -> str | None:
    return text if text.strip() else None


class HermesParser:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number of them, with
    content around them. An unclosed last block counts when its JSON is whole (a model may stop
    right after it)."""

    START, END = "<tool_call>", "</tool_call>"
    _BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)

    def parse(self, text: str, names: Collection[str]) -> tuple[str | None, list[ParsedCall]]:
        if self.START not in text:
            return _content(text), []
        calls, outside, pos = [], [], 0
        for m in self._BLOCK.finditer(text):
            try:
                call = _call_of(json.loads(m.group(1)), names)
            except ValueError:
                call = None
            if call is None:
                return _content(text), []  # one unreadable block: the whole text is content
            calls.append(call)
            outside.append(text[pos : m.start()])
            pos = m.end()
        outside.append(text[pos:])
        return _content("".join(outside)), calls

    def content_end(self, text: str) -> int:
        i = text.find(self.START)
        if i >= 0:
            return i
        # hold back a tail that may be the start of "<tool_call>"
        for k in range(min(len(self.START) - 1, len(text)), 0, -1):
            if self.START.startswith(text[-k:]):
                return len(text) - k
        return len(text)


class Llama3JsonParser:
    """The whole output is a bare JSON call, `{"name": ..., "parameters": {...}}` (or
    "arguments"), optionally after `<|python_tag|>`; several are separated by ";". Anything else
    is content."""

    TAG = "<|python_tag|>"

    def parse(self, text: str, names: Collection[str]) -> tuple[str | None, list[ParsedCall]]:
        body = text.strip()
        body = body.removeprefix(self.TAG).lstrip()
        if not body.startswith("{"):
            return _content(text), []
        decoder, calls, pos = json.JSONDecoder(), [], 0
        while pos < len(body):
            try:
                obj, end = decoder.raw_decode(body, pos)
            except ValueError:
                return _content(text), []
            call = _call_of(obj, names)
            if call is None:
                return _content(text), []
            calls.append(call)
            pos = end
            rest = body[pos:].lstrip()
            if rest.startswith(";"):
                rest = rest[1:].lstrip()
            elif rest:
                return _content(text), []
            pos = len(body) - len(rest)
        return None, calls

    def content_end(self, text: str) -> int:
        body = text.lstrip()
        if not body or body.startswith("{") or self.TAG.startswith(body[: len(self.TAG)]):
            return 0  # may be a call: hold it all until the end
        return len(text)


TOOL_PARSERS: dict[str, type[HermesParser] | type[Llama3JsonParser]] = {
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
}


def get_tool_parser(name: str) -> ToolParser:
    try:
        return TOOL_PARSERS[name]()
    except KeyError:
        raise ValueError(
            f"unknown tool call parser {name!r}; choose one of {', '.join(TOOL_PARSERS)}"
        ) from None


@dataclass
class ForcedCall:
    """One call read from a forced choice's output so far; `arguments` is its raw JSON text
    (complete once `done`)."""

    name: str
    arguments: str
    done: bool


def read_forced(text: str, mode: str, named: str | None) -> list[ForcedCall]:
    """The calls in a (maybe partial) forced output, which the grammar shapes exactly: "named"
    is the arguments object itself; "required" is `[{"name": N, "parameters": A}, ...]` (the
    grammar's own separators, so whitespace between tokens is skipped). The arguments are the
    raw text of A, so partial reads only ever grow and the last read is what the non-streamed
    response says."""
    if mode == "named":
        assert named is not None
        return [ForcedCall(named, text, False)]
    decoder, calls = json.JSONDecoder(), []
    pos = _after(text, 0, "[")
    while pos is not None:
        pos = _after(text, pos, "{")
        pos = _after(text, pos, '"name"')
        pos = _after(text, pos, ":")
        if pos is None:
            break
        try:
            name, pos = decoder.raw_decode(text, _skip_ws(text, pos))
        except ValueError:
            break  # the name is still being written
        pos = _after(text, pos, ",")
        pos = _after(text, pos, '"parameters"')
        pos = _after(text, pos, ":")
        if pos is None:
            break
        start = _skip_ws(text, pos)
        try:
            _, end = decoder.raw_decode(text, start)
        except ValueError:
            end = -1
        close = None if end < 0 else _after(text, end, "}")
        if close is None:
            # the arguments are still being written (a number may yet grow)
            calls.append(ForcedCall(str(name), text[start:], False))
            break
        calls.append(ForcedCall(str(name), text[start:end], True))
        pos = _after(text, close, ",")
    return calls


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \n\r\t":
        pos += 1
    return pos


def _after(text: str, pos: int | None, literal: str) -> int | None:
    """The position past `literal` at `pos` (after whitespace), or None where it is not (yet)
    there."""
    if pos is None:
        return None
    pos = _skip_ws(text, pos)
    return pos + len(literal) if text.startswith(literal, pos) else None
