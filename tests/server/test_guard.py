"""The API key on every route but the open ones, and the preprocessing deadline: 413 when a
request's own tokenizing (or grammar compile) overruns it, 503 + Retry-After when it waited for
a worker; neither leaves anything behind in the engine or the pool."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from server_utils import Server, check_error, running_server

from tokenmill.engine.engine import LLMEngine

pytestmark = pytest.mark.slow  # a server over the default model

KEY = "sekret"
TIMEOUT_S = 0.5
SLOW_S = 2.0  # a "slow" text takes this long to tokenize (see slow_tokenizer)


@pytest.fixture(scope="module")
def guarded(llm_engine: LLMEngine) -> Iterator[Server]:
    with running_server(
        llm_engine, api_key=KEY, preprocess_timeout_s=TIMEOUT_S, preprocess_workers=1
    ) as s:
        yield s


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def test_key_guards_tokenize_detokenize_metrics(guarded: Server) -> None:
    url = guarded.url
    t0 = time.monotonic()
    ten_mb = {"prompt": "1 " * 5_000_000}
    err = check_error(httpx.post(f"{url}/tokenize", json=ten_mb, timeout=60), 401)
    assert err["code"] == "invalid_api_key" and time.monotonic() - t0 < 5
    check_error(httpx.post(f"{url}/tokenize", json={"prompt": "hi"}), 401)
    check_error(httpx.post(f"{url}/detokenize", json={"tokens": [1]}), 401)
    check_error(httpx.get(f"{url}/metrics"), 401)
    check_error(httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer wrong"}), 401)
    check_error(httpx.get(f"{url}/v1/models"), 401)
    r = httpx.post(f"{url}/tokenize", json={"prompt": "hi"}, headers=auth())
    assert r.status_code == 200 and r.json()["count"] == 1
    r = httpx.post(f"{url}/detokenize", json={"tokens": r.json()["tokens"]}, headers=auth())
    assert r.json() == {"prompt": "hi"}
    assert httpx.get(f"{url}/metrics", headers=auth()).status_code == 200
    # open: health, version, API docs, the web page and its assets (404 here: no page yet)
    for path in ("/health", "/version", "/openapi.json", "/docs"):
        assert httpx.get(f"{url}{path}").status_code == 200, path
    for path in ("/", "/static/app.js"):
        assert httpx.get(f"{url}{path}").status_code != 401, path
    check_error(httpx.get(f"{url}/no-such-route"), 401)  # unknown paths need the key too


@pytest.fixture
def slow_tokenizer(guarded: Server, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Texts starting with "SLOW" take SLOW_S to tokenize; returns the texts tokenized so far."""
    tok = guarded.engine.tokenizer
    encode = tok.encode
    seen: list[str] = []
    lock = threading.Lock()

    def slow_encode(text: str, *args, **kwargs) -> list[int]:
        with lock:
            seen.append(text)
        if text.startswith("SLOW"):
            time.sleep(SLOW_S)
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(tok, "encode", slow_encode)
    return seen


def test_deadline_while_tokenizing_is_413(guarded: Server, slow_tokenizer: list[str]) -> None:
    guarded.wait_idle()
    before = guarded.metrics()("tokenmill_request_success_total")
    for path, body, param in (
        ("/tokenize", {"prompt": "SLOW tokenize"}, "prompt"),
        ("/v1/completions", {"prompt": "SLOW completion", "max_tokens": 1}, "prompt"),
    ):
        t0 = time.monotonic()
        r = httpx.post(f"{guarded.url}{path}", json=body, headers=auth(), timeout=60)
        elapsed = time.monotonic() - t0
        err = check_error(r, 413, param)
        assert err["code"] == "preprocess_timeout" and f"{TIMEOUT_S:g}s" in err["message"]
        assert TIMEOUT_S <= elapsed < SLOW_S, elapsed  # answered at the deadline
        time.sleep(SLOW_S)  # the worker finishes the abandoned job; nothing is kept of it
    m = guarded.wait_idle()
    assert m("tokenmill_request_success_total") == before  # the engine never saw them
    r = httpx.post(f"{guarded.url}/tokenize", json={"prompt": "fine"}, headers=auth())
    assert r.status_code == 200


def test_deadline_while_compiling_a_grammar_is_413(
    guarded: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = guarded.engine
    check = engine.check_structured_outputs

    def slow_check(params) -> None:
        time.sleep(SLOW_S)
        check(params)

    monkeypatch.setattr(engine, "check_structured_outputs", slow_check)
    guarded.wait_idle()
    before = guarded.metrics()("tokenmill_request_success_total")
    body = {"prompt": "Hi", "max_tokens": 2, "structured_outputs": {"regex": "[0-9]+"}}
    r = httpx.post(f"{guarded.url}/v1/completions", json=body, headers=auth(), timeout=60)
    err = check_error(r, 413, "structured_outputs")
    assert err["code"] == "preprocess_timeout" and "output grammar" in err["message"]
    time.sleep(SLOW_S)  # the worker finishes the abandoned compile; nothing is queued
    assert guarded.wait_idle()("tokenmill_request_success_total") == before


def test_deadline_while_waiting_is_503(guarded: Server, slow_tokenizer: list[str]) -> None:
    guarded.wait_idle()

    async def main() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=guarded.url, headers=auth(), timeout=60) as c:
            slow = asyncio.ensure_future(c.post("/tokenize", json={"prompt": "SLOW, busy"}))
            await asyncio.sleep(0.1)  # the only worker is now busy for SLOW_S
            waiting = asyncio.ensure_future(c.post("/tokenize", json={"prompt": "queued"}))
            chat = {"messages": [{"role": "user", "content": "queued chat"}], "max_tokens": 1}
            chatting = asyncio.ensure_future(c.post("/v1/chat/completions", json=chat))
            return await slow, await waiting, await chatting

    slow, waiting, chatting = asyncio.run(main())
    check_error(slow, 413, "prompt")
    for r in (waiting, chatting):
        err = check_error(r, 503)
        assert err["code"] == "server_overloaded" and r.headers["retry-after"] == "1"
    time.sleep(SLOW_S)
    # the queued jobs were dropped, never run; the pool serves again
    assert not any("queued" in text for text in slow_tokenizer), slow_tokenizer
    r = httpx.post(f"{guarded.url}/tokenize", json={"prompt": "after"}, headers=auth())
    assert r.status_code == 200
    guarded.wait_idle()
