"""Tool calling in the offline API: `LLM.chat(..., tools=, tool_choice=)` plans, constrains and
parses calls with the server's code (tokenmill.tools): forced calls validate against the tool's
schema, "auto" and "none" behave as on the server, and bad tools or choices raise."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tokenmill import SamplingParams, StructuredOutputsParams
from tokenmill.errors import InvalidRequestError
from tokenmill.tools.choice import Tool, resolve_tool_choice
from utils_tools import CHAT, SCHEMAS, TOOLS

GREEDY = SamplingParams(temperature=0.0, max_tokens=60)


# -- without a model ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tool, problem",
    [
        ({"type": "function"}, "name must match"),
        ({"type": "web", "function": {"name": "x"}}, '"type": "function"'),
        ({"type": "function", "function": {"name": "a b"}}, "name must match"),
        ({"type": "function", "function": {"name": "x", "parameters": [1]}}, "an object"),
    ],
)
def test_bad_tools_raise(tool: dict, problem: str) -> None:
    with pytest.raises(InvalidRequestError, match=problem):
        Tool.from_json(tool, 0)


def test_tool_choice_as_json() -> None:
    tools = [Tool.from_json(t, i) for i, t in enumerate(TOOLS)]
    named = {"type": "function", "function": {"name": "add"}}
    assert resolve_tool_choice(tools, named) == ("named", tools[1].function)
    assert resolve_tool_choice(tools, None) == ("auto", None)
    assert resolve_tool_choice(tools, "required") == ("required", None)
    with pytest.raises(InvalidRequestError, match="not in tools"):
        resolve_tool_choice(tools, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(InvalidRequestError, match="tool_choice must be"):
        resolve_tool_choice(tools, "sometimes")
    with pytest.raises(InvalidRequestError, match="needs tools"):
        resolve_tool_choice(None, "required")


# -- the default model ----------------------------------------------------------------------------


def check_calls(calls: list[dict]) -> None:
    assert calls
    for c in calls:
        assert c["type"] == "function" and c["id"].startswith("call_")
        fn = c["function"]
        jsonschema.validate(json.loads(fn["arguments"]), SCHEMAS[fn["name"]])


@pytest.mark.slow
def test_forced_choices_give_calls_that_validate(default_llm_fp32) -> None:
    llm = default_llm_fp32
    named = {"type": "function", "function": {"name": "get_weather"}}
    (out,) = llm.chat(CHAT, GREEDY, use_tqdm=False, tools=TOOLS, tool_choice=named)
    c = out.outputs[0]
    assert c.content is None and len(c.tool_calls) == 1
    assert c.tool_calls[0]["function"]["name"] == "get_weather"
    check_calls(c.tool_calls)
    outs = llm.chat([CHAT, CHAT], GREEDY, use_tqdm=False, tools=TOOLS, tool_choice="required")
    for out in outs:
        check_calls(out.outputs[0].tool_calls)
    one = llm.chat(
        CHAT, GREEDY, use_tqdm=False, tools=TOOLS, tool_choice="required",
        parallel_tool_calls=False,
    )  # fmt: skip
    assert len(one[0].outputs[0].tool_calls) == 1


@pytest.mark.slow
def test_auto_and_none(default_llm_fp32) -> None:
    llm = default_llm_fp32
    (auto,) = llm.chat(CHAT, GREEDY, use_tqdm=False, tools=TOOLS)
    c = auto.outputs[0]
    assert c.tool_calls is not None  # parsed, maybe to no calls
    if c.tool_calls:
        check_calls(c.tool_calls)
    else:
        assert c.content == (c.text if c.text.strip() else None)
    (none,) = llm.chat(CHAT, GREEDY, use_tqdm=False, tools=TOOLS, tool_choice="none")
    (plain,) = llm.chat(CHAT, GREEDY, use_tqdm=False)
    assert none.outputs[0].tool_calls is None and none.outputs[0].text == plain.outputs[0].text


@pytest.mark.slow
def test_bad_requests_raise_before_anything_runs(default_llm_fp32) -> None:
    llm = default_llm_fp32
    bad_schema = [{"type": "function", "function": {"name": "x", "parameters": {"type": "nope"}}}]
    with pytest.raises(InvalidRequestError, match=r"tools\[0\].function.parameters"):
        llm.chat(CHAT, GREEDY, use_tqdm=False, tools=bad_schema)
    with pytest.raises(InvalidRequestError, match="cannot both"):
        constrained = SamplingParams(structured_outputs=StructuredOutputsParams(regex="a"))
        llm.chat(CHAT, constrained, use_tqdm=False, tools=TOOLS, tool_choice="required")
    with pytest.raises(InvalidRequestError, match="unique"):
        llm.chat(CHAT, GREEDY, use_tqdm=False, tools=TOOLS + TOOLS[:1])
    assert not llm.engine.has_unfinished_requests()
