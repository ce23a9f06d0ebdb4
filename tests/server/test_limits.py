"""Server options: API key (401), body size limit (413), bounded queue (503 + Retry-After),
CORS."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import openai
import pytest
from server_utils import Server, check_error, running_server

from tokenmill.engine.engine import LLMEngine

pytestmark = pytest.mark.slow  # a server over the default model

KEY = "sekret"
ORIGIN = "http://example.com"
MAX_BODY = 4096


@pytest.fixture(scope="module")
def limited(llm_engine: LLMEngine) -> Iterator[Server]:
    with running_server(
        llm_engine,
        max_pending_seqs=2,
        api_key=KEY,
        max_body_bytes=MAX_BODY,
        cors_origins=[ORIGIN],
    ) as s:
        yield s


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def body(server: Server, **kw) -> dict:
    return {"model": server.model, "prompt": "Hello", "max_tokens": 2, **kw}


def test_api_key(limited: Server) -> None:
    url = f"{limited.base_url}/completions"
    err = check_error(httpx.post(url, json=body(limited)), 401)
    assert err["code"] == "invalid_api_key"
    check_error(httpx.post(url, json=body(limited), headers=auth("wrong")), 401)
    check_error(httpx.get(f"{limited.base_url}/models", headers={"Authorization": KEY}), 401)
    assert httpx.post(url, json=body(limited), headers=auth(), timeout=60).status_code == 200
    assert httpx.get(f"{limited.base_url}/models", headers=auth()).status_code == 200
    # open without a key: /health, /version (and the web page); /metrics needs it
    assert httpx.get(f"{limited.url}/health").status_code == 200
    assert httpx.get(f"{limited.url}/version").status_code == 200
    check_error(httpx.get(f"{limited.url}/metrics"), 401)
    assert httpx.get(f"{limited.url}/metrics", headers=auth()).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=limited.base_url, api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=limited.base_url, api_key=KEY, max_retries=0)
    assert client.models.list().data[0].id == limited.model
    # the OpenAPI document says which routes ask for the key
    paths = httpx.get(f"{limited.url}/openapi.json").json()["paths"]
    assert "401" in paths["/v1/completions"]["post"]["responses"]
    assert "401" in paths["/v1/models"]["get"]["responses"]
    assert "401" not in paths["/health"]["get"]["responses"]


def test_oversized_body_is_413(limited: Server) -> None:
    url = f"{limited.base_url}/completions"
    big = body(limited, prompt="word " * MAX_BODY)
    err = check_error(httpx.post(url, json=big, headers=auth()), 413)
    assert str(MAX_BODY) in err["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while reading
        data = json.dumps(big).encode()
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    check_error(httpx.post(url, content=chunks(), headers=auth()), 413)
    assert httpx.post(url, json=body(limited), headers=auth(), timeout=60).status_code == 200


def _open_stream(server: Server) -> socket.socket:
    payload = json.dumps(body(server, max_tokens=2000, ignore_eos=True, stream=True)).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    sock.sendall(
        (
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode()
        + payload
    )
    assert b"200 OK" in sock.recv(65536)
    return sock


def test_full_queue_is_503_with_retry_after(limited: Server) -> None:
    limited.wait_idle()
    socks = [_open_stream(limited) for _ in range(2)]  # the 2 pending slots are taken
    try:
        url = f"{limited.base_url}/completions"
        r = httpx.post(url, json=body(limited), headers=auth(), timeout=60)
        err = check_error(r, 503)
        assert int(r.headers["retry-after"]) >= 1
        assert "retry" in err["message"].lower()
        chat = {"model": limited.model, "messages": [{"role": "user", "content": "hi"}]}
        check_error(
            httpx.post(f"{limited.base_url}/chat/completions", json=chat, headers=auth()), 503
        )
    finally:
        for s in socks:
            s.close()
    limited.wait_idle()
    r = httpx.post(
        f"{limited.base_url}/completions", json=body(limited), headers=auth(), timeout=60
    )
    assert r.status_code == 200


def test_cors(limited: Server) -> None:
    pre = httpx.options(
        f"{limited.base_url}/completions",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.get(f"{limited.base_url}/models", headers={"Origin": ORIGIN, **auth()})
    assert r.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.get(
        f"{limited.base_url}/models", headers={"Origin": "http://evil.test", **auth()}
    )
    assert "access-control-allow-origin" not in other.headers
