"""Capacity limits: a request that can never fit is a 400 naming the limit (a client that retries
503s would loop forever); one that could fit later is a 503 with Retry-After; a request with
several prompts (or n > 1) is admitted whole or not at all."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import openai
import pytest
from server_utils import Server, check_error, running_server

from tokenmill.config import EngineConfig
from tokenmill.engine.engine import LLMEngine

pytestmark = pytest.mark.slow  # a server over the default model

PENDING = 8  # as `--max-num-seqs 4 --max-queue 4` would give
CONTEXT = 64  # the small engine's context, and its whole KV cache: 4 blocks of 16 tokens


@pytest.fixture(scope="module")
def server(llm_engine: LLMEngine) -> Iterator[Server]:
    with running_server(llm_engine, max_pending_seqs=PENDING) as s:
        yield s


def completion(server: Server, **fields) -> httpx.Response:
    body = {"model": server.model, "prompt": "Hello", "max_tokens": 2, **fields}
    return httpx.post(f"{server.base_url}/completions", json=body, timeout=60)


def test_more_sequences_than_the_server_ever_holds_is_400(server: Server) -> None:
    for fields in ({"n": PENDING + 1}, {"n": 3, "prompt": ["a", "b", "c"]}):
        r = completion(server, **fields)
        err = check_error(r, 400, "n")
        assert err["code"] == "capacity_exceeded"
        assert str(PENDING) in err["message"] and "retry" not in r.headers
    chat = {"model": server.model, "messages": [{"role": "user", "content": "hi"}], "n": 9}
    r = httpx.post(f"{server.base_url}/chat/completions", json=chat, timeout=60)
    assert check_error(r, 400, "n")["code"] == "capacity_exceeded"
    # The OpenAI SDK retries 503s; a 400 fails at once.
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=5)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=server.model, prompt="Hi", n=PENDING + 1, max_tokens=1)
    # exactly the limit fits
    r = completion(server, n=4, prompt=["a", "b"])
    assert r.status_code == 200 and len(r.json()["choices"]) == PENDING
    server.wait_idle()


def _open_stream(server: Server, n: int) -> socket.socket:
    """A streaming request that holds `n` sequences until its socket closes."""
    body = {"model": server.model, "prompt": "Hello", "max_tokens": 4000, "ignore_eos": True,
            "stream": True, "n": n}  # fmt: skip
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    assert b"200 OK" in sock.recv(65536)
    return sock


def test_a_multi_prompt_request_is_admitted_whole_or_not_at_all(server: Server) -> None:
    assert completion(server).status_code == 200  # every counter has a series
    server.wait_idle()
    socks = [_open_stream(server, 3) for _ in range(2)]  # 6 of the 8 sequences
    try:
        assert server.async_engine.num_pending_seqs == 6
        before = server.metrics()
        # 2 prompts x n=2 could fit once the streams end: 503, and neither prompt was admitted
        # (one at a time, the first would have run and been aborted).
        r = completion(server, prompt=["a", "b"], n=2)
        err = check_error(r, 503)
        assert int(r.headers["retry-after"]) >= 1 and "retry" in err["message"]
        assert server.async_engine.num_pending_seqs == 6
        after = server.metrics()
        for name in ("tokenmill_prompt_tokens_total", "tokenmill_request_success_total"):
            assert after(name) == before(name), name
        # never fits, busy or not: 400 before 503
        check_error(completion(server, n=PENDING + 1), 400, "n")
        # the 2 sequences left fit
        r = completion(server, prompt=["a"], n=2)
        assert r.status_code == 200 and len(r.json()["choices"]) == 2
    finally:
        for s in socks:
            s.close()
    server.wait_idle()
    assert completion(server, prompt=["a", "b"], n=2).status_code == 200
    server.wait_idle()


@pytest.fixture(scope="module")
def small_server() -> Iterator[Server]:
    engine = LLMEngine(
        EngineConfig(max_model_len=CONTEXT, num_kv_blocks=4, block_size=16, max_num_seqs=4)
    )
    assert engine.num_blocks * 16 == CONTEXT == engine.max_seq_len
    with running_server(engine, max_pending_seqs=8) as s:
        yield s


def test_prompt_plus_max_tokens_at_the_kv_boundary(small_server: Server) -> None:
    """The cache holds one 64-token sequence. Three samples of a 40-token prompt with 24 new
    tokens each fill it exactly: together they would need 2 shared + 3 x 2 own blocks, so they
    run in turn (preempting one another) and every one completes. One token more is a 400."""
    engine = small_server.engine
    prompt = list(range(1000, 1040))
    body = {"prompt": prompt, "n": 3, "temperature": 0, "ignore_eos": True}
    preemptions = engine.scheduler.num_preemptions
    r = completion(small_server, max_tokens=CONTEXT - len(prompt), **body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["finish_reason"] for c in choices] == ["length"] * 3
    assert r.json()["usage"]["completion_tokens"] == 3 * (CONTEXT - len(prompt))
    assert len({c["text"] for c in choices}) == 1  # greedy: recomputation changes nothing
    assert engine.scheduler.num_preemptions > preemptions
    err = check_error(completion(small_server, max_tokens=CONTEXT - len(prompt) + 1, **body), 400)
    assert err["param"] == "max_tokens" and err["code"] == "context_length_exceeded"
    assert str(CONTEXT) in err["message"] and str(CONTEXT + 1) in err["message"]
    err = check_error(completion(small_server, prompt=list(range(CONTEXT)), max_tokens=1), 400)
    assert err["param"] == "prompt" and str(CONTEXT) in err["message"]
    err = check_error(completion(small_server, prompt=prompt, min_tokens=25, max_tokens=None), 400)
    assert err["param"] == "min_tokens" and "24" in err["message"]
    small_server.wait_idle()
