"""Every bad request gets the right status and OpenAI's error shape, never pydantic internals,
and never disturbs the requests already running."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from server_utils import Server, check_error

pytestmark = pytest.mark.slow  # a server over the default model

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Hi"}]


def post(server: Server, path: str, body: dict | None = None, **kw) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60, **kw)


def completion(server: Server, **fields) -> httpx.Response:
    return post(server, "/v1/completions", {"model": server.model, "prompt": PROMPT, **fields})


def chat(server: Server, **fields) -> httpx.Response:
    return post(server, "/v1/chat/completions", {"model": server.model, "messages": CHAT, **fields})


BAD_COMPLETIONS = [
    ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 2}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 1000}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -5}, "max_tokens"),
    ({"max_tokens": "many"}, "max_tokens"),
    ({"logprobs": 50}, "logprobs"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 500}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"stop": [""]}, "stop"),
    ({"stop": [1, 2]}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"seed": "x"}, "seed"),
    ({"top_k": -3}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": -1}, "repetition_penalty"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [[1, 2], "a"]}, "prompt"),
    ({"prompt": [1, 10**9]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"suffix": "x"}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"stop_token_ids": [49152]}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"repetition_penalty": 1e30}, "repetition_penalty"),
    ({"priority": 2**70}, "priority"),
    ({"temperature": 3}, "temperature"),
    ({"top_k": 2**40}, "top_k"),
    ({"seed": 2**64}, "seed"),
    ({"stop": ["x"] * 17}, "stop"),
    ({"stop": "x" * 300}, "stop"),
    ({"logit_bias": {"1.5": 1}}, "logit_bias"),
    ({"logit_bias": {"5": "1"}}, "logit_bias"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"max_tokens": 10**6}, "max_tokens"),
    ({"n": "2"}, "n"),
    ({"n": 1000}, "n"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_COMPLETIONS, ids=lambda x: str(x)[:40])
def test_completion_bad_parameter_is_400(server: Server, fields: dict, param: str) -> None:
    check_error(completion(server, **fields), 400, param)


BAD_CHAT = [
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages[0].content",
    ),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
    ({"temperature": -0.5}, "temperature"),
    ({"max_tokens": 1, "min_tokens": 2}, "min_tokens"),
    ({"stop_token_ids": [10**9]}, "stop_token_ids"),
    ({"max_completion_tokens": 10**6}, "max_completion_tokens"),
    ({"priority": -(2**64)}, "priority"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_CHAT, ids=lambda x: str(x)[:40])
def test_chat_bad_parameter_is_400(server: Server, fields: dict, param: str) -> None:
    check_error(chat(server, **fields), 400, param)


def test_missing_fields_and_bad_bodies(server: Server) -> None:
    check_error(post(server, "/v1/completions", {"model": server.model}), 400, "prompt")
    check_error(post(server, "/v1/chat/completions", {"model": server.model}), 400, "messages")
    url = f"{server.url}/v1/completions"
    headers = {"content-type": "application/json"}
    check_error(httpx.post(url, content=b"{not json", headers=headers), 400)
    check_error(httpx.post(url, content=b"[1, 2]", headers=headers), 400)
    check_error(httpx.post(url), 400)
    for field in ("temperature", "repetition_penalty", "top_p"):  # Python's json accepts NaN
        raw = f'{{"model": "{server.model}", "prompt": "Hi", "{field}": NaN}}'.encode()
        check_error(httpx.post(url, content=raw, headers=headers), 400, field)
    raw = f'{{"model": "{server.model}", "prompt": "Hi", "temperature": Infinity}}'.encode()
    check_error(httpx.post(url, content=raw, headers=headers), 400, "temperature")
    check_error(post(server, "/detokenize", {"tokens": [10**9]}), 400, "tokens")
    check_error(post(server, "/tokenize", {}), 400)


@pytest.mark.parametrize(
    ("fields", "param", "limit"),
    [
        ({"n": 129}, "n", "<= 128"),
        ({"temperature": 3}, "temperature", "<= 2"),
        ({"repetition_penalty": 1e30}, "repetition_penalty", "<= 2"),
        ({"repetition_penalty": 0}, "repetition_penalty", ">= 0.01"),
        ({"priority": 2**70}, "priority", f"<= {2**63 - 1}"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens", "<= max_tokens (2)"),
        ({"stop_token_ids": [49152]}, "stop_token_ids", "[0, 49152)"),
        ({"logit_bias": {"5": -101}}, "logit_bias", "[-100, 100]"),
        ({"stop": ["x"] * 17}, "stop", "at most 16"),
    ],
    ids=lambda x: str(x)[:30],
)
def test_range_errors_name_the_limit(server: Server, fields: dict, param: str, limit: str) -> None:
    err = check_error(completion(server, **fields), 400, param)
    assert err["message"].startswith(param) and limit in err["message"], err["message"]


def test_integers_may_be_written_as_integral_floats(server: Server) -> None:
    """JSON Schema counts 2.0 as an integer, and the OpenAPI document says integer."""
    r = completion(server, prompt=[1.0, 2.0], max_tokens=2.0, n=2.0, ignore_eos=True)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 2
    assert r.json()["usage"]["prompt_tokens"] == 2
    assert r.json()["usage"]["completion_tokens"] == 4


def test_context_window_errors_name_both_numbers(server: Server) -> None:
    limit = server.engine.max_model_len
    num_prompt = len(server.engine.tokenizer.encode(PROMPT))
    err = check_error(completion(server, max_tokens=limit), 400, "max_tokens")
    assert str(limit) in err["message"] and str(num_prompt + limit) in err["message"]
    assert err["code"] == "context_length_exceeded"
    err = check_error(chat(server, max_completion_tokens=limit), 400, "max_completion_tokens")
    assert str(limit) in err["message"]
    long_prompt = [7] * (limit + 5)
    err = check_error(completion(server, prompt=long_prompt, max_tokens=1), 400, "prompt")
    assert str(limit) in err["message"] and str(limit + 5) in err["message"]


def test_unknown_model_and_route(server: Server) -> None:
    err = check_error(completion(server, model="no-such-model"), 404, "model")
    assert "no-such-model" in err["message"]
    check_error(chat(server, model="no-such-model"), 404, "model")
    check_error(httpx.get(f"{server.url}/v1/nothing-here"), 404)
    check_error(httpx.get(f"{server.url}/v1/completions"), 405)


def test_openai_client_exceptions(server: Server) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server.model, prompt=PROMPT, temperature=-1)
    assert e.value.status_code == 400
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=server.model, messages=CHAT, stream=True, n=0)


def test_bad_requests_do_not_disturb_running_ones(server: Server) -> None:
    body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    expected = completion(server, **body).json()["choices"][0]["text"]

    async def main() -> tuple[str, list[int]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:

            async def stream() -> str:
                text = ""
                payload = {"model": server.model, "stream": True, **body}
                async with client.stream("POST", "/v1/completions", json=payload) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            chunk = json.loads(line[6:])
                            text += chunk["choices"][0]["text"] if chunk["choices"] else ""
                return text

            async def bad(i: int) -> int:
                await asyncio.sleep(0.05 * i)
                fields, _ = BAD_COMPLETIONS[i % len(BAD_COMPLETIONS)]
                payload = {"model": server.model, "prompt": PROMPT, **fields}
                r = await client.post("/v1/completions", json=payload)
                return r.status_code

            results = await asyncio.gather(stream(), *(bad(i) for i in range(len(BAD_COMPLETIONS))))
            return results[0], list(results[1:])

    text, statuses = asyncio.run(main())
    assert text == expected
    assert set(statuses) == {400}
    assert httpx.get(f"{server.url}/health").status_code == 200
    server.wait_idle()
