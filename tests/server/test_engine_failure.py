"""When the engine loop dies (a step raises), /health turns 503 and requests fail fast with a
500 in OpenAI's error shape instead of hanging."""

from __future__ import annotations

import json

import httpx
import pytest
from server_utils import Server, check_engine_idle, check_error

from tokenmill.engine.engine import LLMEngine

pytestmark = pytest.mark.slow  # a server over the default model


def test_health_503_when_the_engine_loop_dies(
    llm_engine: LLMEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_step():
        raise RuntimeError("simulated device failure")

    server = Server(llm_engine)
    monkeypatch.setattr(llm_engine, "step", broken_step)
    server.start()
    body = {"model": server.model, "prompt": "Hello", "max_tokens": 2}
    try:
        assert httpx.get(f"{server.url}/health").status_code == 200
        # a stream already under way when the loop dies: the error arrives in-band, then [DONE]
        chat = {"model": server.model, "messages": [{"role": "user", "content": "Hi"}]}
        with httpx.stream(
            "POST", f"{server.base_url}/chat/completions", json={**chat, "stream": True}
        ) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert err["type"] == "server_error" and "engine" in err["message"]
        check_error(httpx.get(f"{server.url}/health"), 503)
        assert server.metrics()("tokenmill_engine_healthy") == 0
        # later requests fail fast with a 500 in OpenAI's shape instead of hanging
        err = check_error(httpx.post(f"{server.base_url}/completions", json=body, timeout=60), 500)
        assert "engine" in err["message"]
        r = httpx.post(f"{server.base_url}/completions", json={**body, "stream": True}, timeout=60)
        check_error(r, 500)
        assert httpx.get(f"{server.base_url}/models").status_code == 200
    finally:
        server.stop()
        monkeypatch.undo()
        for rid in list(llm_engine.outputs.states):  # the failed step left its request behind
            llm_engine.abort_request(rid)
    check_engine_idle(llm_engine)
