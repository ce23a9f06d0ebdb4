"""Structured output over HTTP: OpenAI's response_format (the official client's `parse` with a
pydantic model, json_schema, json_object), vLLM's structured_outputs extra on completions and
chat, and a 400 naming the problem for a spec that does not compile (the server keeps serving)."""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from server_utils import Server, check_error

pytestmark = pytest.mark.slow  # a server over the default model

CHAT = [{"role": "user", "content": "Describe a person in JSON."}]


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", timeout=120, max_retries=0)


class Person(BaseModel):
    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=120)
    role: Literal["admin", "guest"]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_parse_returns_the_pydantic_object(client: openai.OpenAI, temperature: float) -> None:
    r = client.chat.completions.parse(
        model=client.models.list().data[0].id,
        messages=CHAT,
        response_format=Person,
        max_tokens=48,
        temperature=temperature,
        seed=1,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Person)
    assert Person.model_validate_json(choice.message.content) == choice.message.parsed


def chat(server: Server, **body) -> httpx.Response:
    body = {"messages": CHAT, "max_tokens": 40, "temperature": 0, **body}
    return httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=120)


def content(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_json_schema_and_json_object(server: Server) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Rome"]}, "n": {"type": "integer"}},
        "required": ["city", "n"],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "c", "schema": schema, "strict": True}}
    jsonschema.validate(json.loads(content(chat(server, response_format=fmt))), schema)
    r = chat(server, response_format={"type": "json_object"}, max_tokens=80, seed=3)
    if r.json()["choices"][0]["finish_reason"] == "stop":  # any object may run long
        assert isinstance(json.loads(content(r)), dict)
    else:
        assert content(r).lstrip().startswith("{")
    assert content(chat(server, response_format={"type": "text"}, max_tokens=4))


def test_structured_outputs_extra_on_completions_and_chat(server: Server) -> None:
    body = {"prompt": "The year is", "max_tokens": 10, "temperature": 1.0, "seed": 5, "n": 3}
    r = httpx.post(
        f"{server.base_url}/completions",
        json={**body, "structured_outputs": {"regex": "(19|20)[0-9]{2}"}},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    for c in r.json()["choices"]:
        assert re.fullmatch("(19|20)[0-9]{2}", c["text"]) and c["finish_reason"] == "stop"
    choices = ["sunny", "rainy"]
    assert content(chat(server, structured_outputs={"choice": choices})) in choices
    grammar = 'root ::= "A" | "B"'
    assert content(chat(server, structured_outputs={"grammar": grammar})) in ("A", "B")
    gbnf = 'root ::= "n=" num\nnum ::= [1-9] digit\ndigit ::= | [0-9]'  # llama.cpp's empty alt
    assert re.fullmatch(
        "n=[1-9][0-9]?", content(chat(server, structured_outputs={"grammar": gbnf}))
    )


def test_structural_tag_constrains_the_tagged_region(server: Server) -> None:
    """The prompt asks for the tag; whatever the model writes, a region it opens holds JSON of
    the schema up to the end string."""
    tool = {
        "begin": "<call>",
        "schema": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
        "end": "</call>",
    }
    fmt = {"type": "structural_tag", "structures": [tool], "triggers": ["<call>"]}
    body = {"messages": [{"role": "user", "content": "Write <call> then JSON."}], "max_tokens": 60}
    for r in (
        chat(server, **body, response_format=fmt),
        chat(server, **body, structured_outputs={"structural_tag": json.dumps(fmt)}),
    ):
        text = content(r)
        for region in re.findall(r"<call>(.*?)</call>", text, re.S):
            assert isinstance(json.loads(region)["n"], int), text


def test_structured_stream_matches_non_stream(server: Server) -> None:
    body = {"structured_outputs": {"json": {"type": "array", "items": {"type": "boolean"},
            "maxItems": 3}}}  # fmt: skip
    whole = content(chat(server, **body))
    with httpx.stream(
        "POST",
        f"{server.base_url}/chat/completions",
        json={"messages": CHAT, "max_tokens": 40, "temperature": 0, "stream": True, **body},
        timeout=120,
    ) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line[6:].startswith("{")]
    streamed = "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
    )
    assert streamed == whole and isinstance(json.loads(whole), list)


@pytest.mark.parametrize(
    "body, param, problem",
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nope"}},
                }
            },
            "response_format.json_schema.schema",
            'Unsupported type "nope"',
        ),  # fmt: skip
        ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs", "Regex parsing error"),
        ({"structured_outputs": {"grammar": "root ::= x"}}, "structured_outputs", 'Rule "x"'),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "one of"),
        ({"structured_outputs": {"json": "{oops"}}, "structured_outputs", "not valid JSON"),
        (
            {"structured_outputs": {"structural_tag": {"structures": [], "triggers": []}}},
            "structured_outputs",
            "triggers",
        ),
        (
            {"response_format": {"type": "structural_tag", "structures": []}},
            "response_format",
            "needs `format`",
        ),
        (
            {"structured_outputs": {"grammar": "root ::= <[5]>"}},
            "structured_outputs",
            "token references",
        ),
        (
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
            "response_format",
            "cannot both",
        ),
        (
            {"response_format": {"type": "json_schema"}},
            "response_format",
            "json_schema is required",
        ),
        ({"response_format": {"type": "xml"}}, "response_format", None),
    ],
)
def test_bad_spec_is_a_400_and_the_server_keeps_serving(
    server: Server, body: dict, param: str, problem: str | None
) -> None:
    err = check_error(chat(server, **body), 400)
    assert err["param"].startswith(param), err
    if problem is not None:
        assert problem in err["message"], err
    assert content(chat(server, max_tokens=2))  # the next request is answered
    r = httpx.post(
        f"{server.base_url}/completions",
        json={"prompt": "Hi", "max_tokens": 2, "structured_outputs": {"regex": "[a-"}},
        timeout=120,
    )
    check_error(r, 400, "structured_outputs")
