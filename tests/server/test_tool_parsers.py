"""Tool calls out of canned model text: the hermes and llama3_json parsers (malformed text is
plain content), the forced-output reader on partial text, the streamed deltas joining to the
final message, and the default prompt format for templates without tools."""

from __future__ import annotations

import json

import pytest

from tokenmill.engine.chat_template import compile_chat_template, render_chat_template
from tokenmill.server.protocol import ChatCompletionRequest
from tokenmill.server.serving_tools import ToolCallStream, plan_tools, template_inputs
from tokenmill.tools.parsers import HermesParser, Llama3JsonParser, read_forced

NAMES = {"get_weather", "add"}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}


def test_hermes_calls_and_content() -> None:
    text = (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        '</tool_call>\n<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    )
    content, calls = HermesParser().parse(text, NAMES)
    assert content == "Let me check.\n\n"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("add", {"a": 1, "b": 2}),
    ]
    # only calls: no content; an unclosed last block whose JSON is whole still counts
    content, calls = HermesParser().parse(
        '<tool_call>{"name": "add", "arguments": {"a": 1}}', NAMES
    )
    assert content is None and [c.name for c in calls] == ["add"]


@pytest.mark.parametrize(
    "text",
    [
        "Just an answer.",
        '<tool_call>{"name": "add", "arguments": {"a": 1</tool_call>',  # bad JSON
        '<tool_call>{"name": "nope", "arguments": {}}</tool_call>',  # not a listed tool
        '<tool_call>{"arguments": {}}</tool_call>',  # no name
        '<tool_call>{"name": "add", "arguments": 3}</tool_call>',  # arguments not an object
        'ok <tool_call>{"name": "add", "arguments": {}}</tool_call><tool_call>[1]</tool_call>',
    ],
)
def test_hermes_malformed_is_plain_content(text: str) -> None:
    assert HermesParser().parse(text, NAMES) == (text, [])


def test_llama3_json() -> None:
    p = Llama3JsonParser()
    content, calls = p.parse('{"name": "add", "parameters": {"a": 1}}', NAMES)
    assert content is None and calls[0].name == "add" and json.loads(calls[0].arguments) == {"a": 1}
    text = '<|python_tag|>{"name": "add", "arguments": {"a": 1}}; {"name": "get_weather", ' + (
        '"parameters": {"city": "Rome"}}'
    )
    assert [c.name for c in p.parse(text, NAMES)[1]] == ["add", "get_weather"]
    for bad in ["Hello there", '{"name": "add", "parameters": {"a": ', '{"x": 1}', '{"name": '
                '"add", "parameters": {}} trailing words']:  # fmt: skip
        assert p.parse(bad, NAMES) == (bad, [])
    assert p.content_end('{"name"') == 0 and p.content_end("Hi") == 2


def test_hermes_content_end_holds_back_a_possible_tag() -> None:
    p = HermesParser()
    assert p.content_end("Sure <tool_c") == len("Sure ")
    assert p.content_end("Sure <tool_call>{") == len("Sure ")
    assert p.content_end("a < b") == len("a < b")


def test_read_forced_partial_reads_grow_to_the_final_calls() -> None:
    final = (
        '[{"name":"add","parameters":{"a":12}},{"name":"get_weather","parameters":{"city":"x"}}]'
    )
    previous: list[tuple[str, str]] = []
    for n in range(len(final) + 1):
        calls = [(c.name, c.arguments) for c in read_forced(final[:n], "required", None)]
        assert len(calls) >= len(previous)
        for (name, args), (pname, pargs) in zip(calls, previous, strict=False):
            assert name == pname and args.startswith(pargs)
        previous = calls
    calls = read_forced(final, "required", None)
    assert [(c.name, c.arguments, c.done) for c in calls] == [
        ("add", '{"a":12}', True),
        ("get_weather", '{"city":"x"}', True),
    ]
    assert read_forced('{"a":1}', "named", "add")[0].arguments == '{"a":1}'
    spaced = '[{"name": "add", "parameters": {"a": 1}}, {"name": "add", "parameters": {}}]'
    assert [c.arguments for c in read_forced(spaced, "required", None)] == ['{"a": 1}', "{}"]


def _request(**body: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER, ADD], **body}
    )


@pytest.mark.parametrize(
    ("choice", "text"),
    [
        ("auto", 'Sure.\n<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'),
        ("auto", "No tools needed <tool_c here."),
        ("required", '[{"name":"add","parameters":{"a":1}},{"name":"add","parameters":{}}]'),
        ({"type": "function", "function": {"name": "get_weather"}}, '{"city":"Paris"}'),
    ],
)
def test_streamed_deltas_join_to_the_final_message(choice: object, text: str) -> None:
    plan = plan_tools(_request(tool_choice=choice), "hermes")
    stream = ToolCallStream(plan)
    content, calls = "", {}
    for n in range(1, len(text) + 1):
        new, deltas = stream.step(text[:n], n == len(text))
        content += new
        for d in deltas:
            call = calls.setdefault(d["index"], {"id": None, "name": "", "arguments": ""})
            call["id"] = d.get("id", call["id"])
            call["name"] += d["function"].get("name", "")
            call["arguments"] += d["function"].get("arguments", "")
    final_content, final_calls = stream.final(text)
    assert (content or None) == final_content
    joined = [calls[i] for i in sorted(calls)]
    expected = [
        {"id": c["id"], "name": c["function"]["name"], "arguments": c["function"]["arguments"]}
        for c in final_calls
    ]
    assert joined == expected
    assert bool(final_calls) == ("<tool_c here" not in text)


def test_default_format_renders_tools_calls_and_results() -> None:
    plan = plan_tools(_request(), "hermes")
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },  # fmt: skip
        {"role": "tool", "tool_call_id": "call_1", "content": "22 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "sunny"},
    ]
    out, tools = template_inputs(plan, messages, "{{ messages }}")
    assert tools is None
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert '"name": "get_weather"' in out[0]["content"] and "<tool_call>" in out[0]["content"]
    assert out[2]["content"] == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    )
    assert out[3]["content"] == (
        "<tool_response>\n22 C\n</tool_response>\n<tool_response>\nsunny\n</tool_response>"
    )
    # a template that renders tools itself gets them, and the messages untouched
    native = "{% for t in tools %}{{ t }}{% endfor %}"
    out, tools = template_inputs(plan, messages, native)
    assert out is messages and tools is not None and len(tools) == 2


NATIVE = (
    "{% for t in tools %}<{{ t.function.name }}>{% endfor %}"
    "{% for m in messages %}[{{ m.role }}]{{ m.content }}"
    "{% for c in m.tool_calls or [] %}{{ c.function.name }}{{ c.function.arguments | tojson }}"
    "{% endfor %}{% if m.tool_call_id %}({{ m.tool_call_id }}){% endif %}{% endfor %}"
)


def test_native_template_gets_tools_calls_and_results() -> None:
    req = _request(
        messages=[
            {"role": "user", "content": "2+3?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_9",
                        "type": "function",
                        "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'},
                    }
                ],
            },  # fmt: skip
            {"role": "tool", "tool_call_id": "call_9", "content": "5"},
        ]
    )
    plan = plan_tools(req, "hermes")
    messages, tools = template_inputs(plan, [m.as_template_dict() for m in req.messages], NATIVE)
    text = render_chat_template(compile_chat_template(NATIVE), messages, False, tools, None, {})
    # the arguments reach the template as a mapping (transformers' convention)
    assert text == '<get_weather><add>[user]2+3?[assistant]add{"a": 2, "b": 3}[tool]5(call_9)'
