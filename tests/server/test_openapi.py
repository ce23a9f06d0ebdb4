"""/openapi.json describes the server as it is: the statuses each route answers (400, never
FastAPI's 422), OpenAI's error body, the real media types, and the limits the server enforces,
including those of the served model."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema_rs
import pytest
from server_utils import Server

pytestmark = pytest.mark.slow  # a server over the default model


@pytest.fixture(scope="module")
def doc(server: Server) -> dict[str, Any]:
    r = httpx.get(f"{server.url}/openapi.json", timeout=30)
    assert r.status_code == 200
    return r.json()


def operations(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(m.upper(), p): op for p, item in doc["paths"].items() for m, op in item.items()}


def validator(doc: dict[str, Any], name: str) -> jsonschema_rs.Validator:
    schema = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
    return jsonschema_rs.validator_for(schema)


def test_statuses_and_bodies(doc: dict[str, Any]) -> None:
    text = json.dumps(doc)
    assert '"422"' not in text and "ValidationError" not in text
    ops = operations(doc)
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = ops["POST", path]["responses"]
        # 429: a request that cannot meet its slo (--slo-reject-hopeless)
        assert set(responses) == {"200", "400", "404", "413", "429", "500", "503"}
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
        assert "Retry-After" in responses["503"]["headers"]
    # the tokenizer pool's deadline answers 503 + Retry-After when a request mostly waited
    tokenize = ops["POST", "/tokenize"]["responses"]
    assert set(tokenize) == {"200", "400", "404", "413", "500", "503"}
    assert "Retry-After" in tokenize["503"]["headers"]
    assert set(ops["GET", "/health"]["responses"]) == {"200", "413", "500", "503"}
    metrics = ops["GET", "/metrics"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    for op in ops.values():
        for status, resp in op["responses"].items():
            if status != "200":
                assert resp["content"] == {"application/json": {"schema": error}}
            assert status != "401"  # this server has no API key
    check = validator(doc, "ErrorResponse")
    assert check.is_valid({"error": {"message": "m", "type": "t", "param": None, "code": None}})
    assert not check.is_valid({"detail": [{"loc": ["body"], "msg": "m"}]})


def test_limits_of_the_served_model(doc: dict[str, Any], server: Server) -> None:
    engine = server.engine
    context, vocab = engine.max_seq_len, engine.model_config.vocab_size
    req = validator(doc, "CompletionRequest")
    ok = {"prompt": [0, vocab - 1], "max_tokens": context - 1, "model": server.model}
    assert req.is_valid(ok)
    for bad in (
        {"prompt": [vocab]},
        {"prompt": [0] * context},
        {"prompt": [[1], [0] * context]},
        {"max_tokens": context},
        {"min_tokens": context},
        {"model": "other"},
        {"n": 129},
        {"temperature": 2.5},
        {"repetition_penalty": 1e30},
        {"priority": 2**70},
        {"stop": ["x"] * 17},
        {"stop_token_ids": [vocab]},
        {"logit_bias": {str(vocab): 1}},
        {"logit_bias": {"abc": 1}},
        {"logit_bias": {"5": 101}},
        {"suffix": "x"},
        {"prompt": ""},
        {"prompt": []},
        {"stream_options": {"include_usage": True}},
    ):
        assert not req.is_valid({**ok, **bad}), bad
    assert req.is_valid({**ok, "stream": True, "stream_options": {"include_usage": True}})
    chat = validator(doc, "ChatCompletionRequest")
    messages = [{"role": "user", "content": "hi"}]
    assert not chat.is_valid({"messages": messages, "top_logprobs": 2})
    assert chat.is_valid({"messages": messages, "top_logprobs": 2, "logprobs": True})
    assert not chat.is_valid({"messages": []})
    assert req.is_valid({**ok, "logit_bias": {str(vocab - 1): -100, "007": 100}})


def test_tokenize_takes_exactly_one_of_prompt_or_messages(doc: dict[str, Any]) -> None:
    check = validator(doc, "TokenizeRequest")
    messages = [{"role": "user", "content": "hi"}]
    assert check.is_valid({"prompt": "hi"})
    assert check.is_valid({"messages": messages})
    assert check.is_valid({"messages": messages, "prompt": None})
    assert not check.is_valid({})
    assert not check.is_valid({"prompt": "hi", "messages": messages})
