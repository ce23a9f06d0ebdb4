"""Tool calling over HTTP with the official client: forced calls (required, a named function)
whose arguments validate against the tool's schema, streamed and not (the deltas join to the
same calls), one call without parallel calls, auto, a multi-turn exchange with a tool result,
and 400s for bad tool specs (the server keeps serving)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from server_utils import Server, check_error

from utils_tools import CHAT, SCHEMAS, TOOLS

pytestmark = pytest.mark.slow  # a server over the default model


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", timeout=120, max_retries=0)


def create(client: openai.OpenAI, **kw: Any) -> Any:
    body = {"model": client.models.list().data[0].id, "messages": CHAT, "tools": TOOLS,
            "max_tokens": 60, "temperature": 0, **kw}  # fmt: skip
    return client.chat.completions.create(**body)


def check_calls(calls: list[tuple[str, str, str]]) -> None:
    """(id, name, arguments) of each call: a known tool, arguments valid for its schema."""
    assert calls
    for call_id, name, args in calls:
        assert call_id.startswith("call_") and len(call_id) > 10
        jsonschema.validate(json.loads(args), SCHEMAS[name])


def streamed_calls(client: openai.OpenAI, **kw: Any) -> tuple[list[tuple[str, str, str]], str]:
    calls: dict[int, list[str]] = {}
    finish = None
    for chunk in create(client, stream=True, **kw):
        for choice in chunk.choices:
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, ["", "", ""])
                if d.id:
                    assert not call[0], "the id comes once, in the call's first chunk"
                    call[0] = d.id
                if d.function and d.function.name:
                    call[1] += d.function.name
                if d.function and d.function.arguments:
                    call[2] += d.function.arguments
            finish = choice.finish_reason or finish
    assert finish is not None
    return [tuple(calls[i]) for i in sorted(calls)], finish  # type: ignore[misc]


def message_calls(r: Any) -> list[tuple[str, str, str]]:
    return [(c.id, c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls]


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_forced_calls_validate_streamed_and_not(client: openai.OpenAI, choice: Any) -> None:
    r = create(client, tool_choice=choice)
    assert r.choices[0].finish_reason == "tool_calls"
    assert r.choices[0].message.content is None
    calls = message_calls(r)
    check_calls(calls)
    if not isinstance(choice, str):
        assert [name for _, name, _ in calls] == ["get_weather"]
    streamed, finish = streamed_calls(client, tool_choice=choice)
    assert finish == "tool_calls"
    check_calls(streamed)
    # same text at temperature 0: the same calls but for the fresh ids
    assert [c[1:] for c in streamed] == [c[1:] for c in calls]


def test_no_parallel_calls_gives_exactly_one(client: openai.OpenAI) -> None:
    r = create(client, tool_choice="required", parallel_tool_calls=False)
    assert len(r.choices[0].message.tool_calls) == 1
    check_calls(message_calls(r))


def test_auto_and_none_answer(client: openai.OpenAI) -> None:
    for choice in ("auto", "none"):
        r = create(client, tool_choice=choice, max_tokens=24)
        msg = r.choices[0].message
        assert msg.content or msg.tool_calls, choice
        if msg.tool_calls:  # the parser only returns calls of listed tools, as JSON
            assert choice == "auto"
            assert all(json.loads(c.function.arguments) is not None for c in msg.tool_calls)
            assert r.choices[0].finish_reason == "tool_calls"


def test_auto_streamed_joins_to_the_message(client: openai.OpenAI) -> None:
    r = create(client, tool_choice="auto", max_tokens=24)
    content, finish = "", None
    for chunk in create(client, tool_choice="auto", max_tokens=24, stream=True):
        for choice in chunk.choices:
            assert not choice.delta.tool_calls or r.choices[0].message.tool_calls
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert (content or None) == r.choices[0].message.content
    assert finish == r.choices[0].finish_reason


def test_multi_turn_with_a_tool_result(client: openai.OpenAI, server: Server) -> None:
    first = create(client, tool_choice="required", parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    messages = [
        *CHAT,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    r = create(client, messages=messages, tool_choice="none", max_tokens=20)
    assert r.choices[0].message.content
    # the tool result is in the prompt: it costs tokens a conversation without it does not
    r2 = create(client, messages=messages[:2], tool_choice="none", max_tokens=1)
    assert r.usage.prompt_tokens > r2.usage.prompt_tokens


def chat(server: Server, **body: Any) -> httpx.Response:
    body = {"messages": CHAT, "tools": TOOLS, "max_tokens": 4, "temperature": 0, **body}
    return httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=120)


def tool(parameters: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "f", "parameters": parameters}}


BAD = [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [tool({"type": "nonsense"})]}, "tools[0].function.parameters"),
    ({"tools": [TOOLS[1], tool({"$ref": "#/x"})], "tool_choice": "required"},
     "tools[1].function.parameters"),
    ({"tools": [tool({"properties": 3})], "tool_choice": "none"}, "tools[0].function.parameters"),
    ({"tools": [tool({"properties": {"x": {"type": "string", "pattern": "(("}}})]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "retrieval"}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools"),
    ({"tools": [TOOLS[1], TOOLS[1]]}, "tools"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "param"), BAD, ids=lambda x: str(x)[:40])
def test_bad_tool_specs_are_400(server: Server, fields: dict, param: str) -> None:
    check_error(chat(server, **fields), 400, param)
    named = {"type": "function", "function": {"name": "add"}}
    r = chat(server, tool_choice=named, max_tokens=30)  # and the server keeps serving
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["tool_calls"]
