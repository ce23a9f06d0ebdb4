"""The slo and workflow request extras over HTTP: validation (400), the response's slo field,
SLO metrics, and 429 for a request that cannot meet its SLO (--slo-reject-hopeless)."""

from __future__ import annotations

import dataclasses

import httpx
import pytest
from server_utils import Server, check_error

pytestmark = pytest.mark.slow  # a server over the default model


@pytest.mark.parametrize(
    "extra",
    [
        {"slo": {"ttft_ms": 0}},
        {"slo": {"deadline_ms": -5}},
        {"slo": {"tpot_ms": "fast"}},
        {"slo": {"ttft_ms": 100, "bogus": 1}},
        {"slo": "soon"},
        {"workflow": {"stage": 0}},
        {"workflow": {"id": "w", "remaining_stages": -1}},
        {"workflow": {"id": "w", "stage": 10**6}},
    ],
)
@pytest.mark.parametrize("path", ["completions", "chat/completions"])
def test_bad_slo_fields_are_400(server: Server, extra: dict, path: str) -> None:
    body: dict = {"model": server.model, "max_tokens": 2, **extra}
    if path == "completions":
        body["prompt"] = "Hi"
    else:
        body["messages"] = [{"role": "user", "content": "Hi"}]
    r = httpx.post(f"{server.base_url}/{path}", json=body, timeout=60)
    err = check_error(r, 400)
    assert err["param"] is None or err["param"].split(".")[0] in extra


def test_slo_field_and_metrics(server: Server) -> None:
    before = server.metrics()
    body = {
        "model": server.model,
        "prompt": "Hello",
        "max_tokens": 3,
        "slo": {"ttft_ms": 60_000, "deadline_ms": 120_000},
        "workflow": {"id": "wf-1", "stage": 0, "remaining_stages": 2},
    }
    r = httpx.post(f"{server.base_url}/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["slo"] == {"hopeless": False}
    chat = {"model": server.model, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 2, "slo": {"tpot_ms": 60_000}}  # fmt: skip
    r = httpx.post(f"{server.base_url}/chat/completions", json=chat, timeout=120)
    assert r.status_code == 200 and r.json()["slo"] == {"hopeless": False}
    m = server.wait_idle()
    cls = "ttft+deadline"
    old = sum(v for n, lab, v in before.series if n == "tokenmill_slo_met_total"
              and lab.get("slo_class") == cls)  # fmt: skip
    assert m("tokenmill_slo_requests_total", slo_class=cls) >= 1
    assert m("tokenmill_slo_met_total", slo_class=cls) == old + 1
    assert m("tokenmill_slo_attainment", slo_class="tpot") == 1.0
    assert m("tokenmill_slo_missed_total", target="deadline") >= 0
    assert m("tokenmill_slo_hopeless_rejected_total") >= 0


def test_hopeless_request_is_429(server: Server) -> None:
    engine = server.engine
    saved = engine.config
    engine.config = dataclasses.replace(saved, scheduling_policy="slo", slo_reject_hopeless=True)
    try:
        before = server.metrics()("tokenmill_slo_hopeless_rejected_total")
        body = {"model": server.model, "prompt": "Hello " * 50, "max_tokens": 50,
                "slo": {"deadline_ms": 0.01}}  # fmt: skip
        r = httpx.post(f"{server.base_url}/completions", json=body, timeout=60)
        assert r.status_code == 429, r.text
        err = r.json()["error"]
        assert err["code"] == "slo_unattainable" and err["param"] == "slo"
        assert "deadline_ms cannot be met" in err["message"]
        m = server.wait_idle()
        assert m("tokenmill_slo_hopeless_rejected_total") == before + 1
    finally:
        engine.config = saved
