"""The chat page at GET /, driven in headless Chromium against a real server on the default model:
streaming, multi-turn, stop (the request is aborted and its KV blocks freed), errors shown, and
model text that is never run as markup."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from browser_utils import TIMEOUT_MS, launch_browser, open_page
from server_utils import Server, check_engine_idle

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Locator, Page, Request, Route

pytestmark = [pytest.mark.slow, pytest.mark.browser]

STATS = re.compile(r"(\d+) tokens? · [\d.]+ tok/s · (\d+) of (\d+) prompt tokens cached")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with launch_browser() as b:
        yield b


def load(page: Page, server: Server) -> None:
    page.goto(f"{server.url}/")
    page.wait_for_function(
        "m => document.getElementById('model').value === m", arg=server.model, timeout=TIMEOUT_MS
    )


def send(page: Page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def answer(page: Page, i: int, state: str = "done") -> Locator:
    from playwright.sync_api import expect

    loc = page.locator(".msg.assistant").nth(i)
    expect(loc).to_have_attribute("data-state", state, timeout=TIMEOUT_MS)
    return loc


def chat_bodies(page: Page) -> list[dict[str, Any]]:
    """The bodies of the page's chat requests, in order, as they are sent."""
    bodies: list[dict[str, Any]] = []

    def on_request(req: Request) -> None:
        if req.url.endswith("/v1/chat/completions"):
            bodies.append(req.post_data_json)

    page.on("request", on_request)
    return bodies


def test_page_is_served(server: Server) -> None:
    r = httpx.get(f"{server.url}/", timeout=30)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'sha256-" in csp and "unsafe-inline" not in csp
    assert "connect-src 'self'" in csp
    assert "<script>" in r.text and 'id="messages"' in r.text
    assert "http://" not in r.text and "https://" not in r.text  # nothing loaded from elsewhere


def test_streams_multi_turn_conversation(browser: Browser, server: Server) -> None:
    with open_page(browser) as (page, _):
        bodies = chat_bodies(page)
        load(page, server)
        page.fill("#system", "You are a terse assistant.")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "24")
        # every text length the answer passes through, seen by the page itself
        page.evaluate("""() => {
            window.__lengths = [];
            new MutationObserver(() => {
                const c = document.querySelector('.msg.assistant:last-child .content');
                if (c) window.__lengths.push(c.textContent.length);
            }).observe(document.getElementById('thread'),
                       {childList: true, subtree: true, characterData: true});
        }""")
        send(page, "Write two sentences about the sea.")
        first = answer(page, 0)
        lengths = page.evaluate("window.__lengths")
        grown = sorted({n for n in lengths if n > 0})
        assert len(grown) >= 3, f"the answer did not stream: lengths {lengths}"
        text = first.locator(".content").inner_text()
        assert text and len(text) == grown[-1]
        m = STATS.search(first.locator(".meta").inner_text())
        assert m, first.locator(".meta").inner_text()
        assert 0 < int(m[1]) <= 24 and int(m[3]) > 0
        assert bodies[0]["stream"] is True and bodies[0]["stream_options"]["include_usage"]
        assert bodies[0]["model"] == server.model
        assert bodies[0]["temperature"] == 0 and bodies[0]["max_tokens"] == 24

        # Shift+Enter adds a line and does not send; Enter sends the whole conversation
        page.fill("#input", "And one")
        page.press("#input", "Shift+Enter")
        assert page.input_value("#input") == "And one\n"
        page.type("#input", "more.")
        page.press("#input", "Enter")
        second = answer(page, 1)
        roles = [msg["role"] for msg in bodies[1]["messages"]]
        assert roles == ["system", "user", "assistant", "user"]
        assert bodies[1]["messages"][0]["content"] == "You are a terse assistant."
        assert bodies[1]["messages"][2]["content"] == text
        assert bodies[1]["messages"][3]["content"] == "And one\nmore."
        m2 = STATS.search(second.locator(".meta").inner_text())
        assert m2 and int(m2[2]) > 0, "the first turn's prompt should come from the prefix cache"

        page.click("#new-chat")
        assert page.locator(".msg").count() == 0 and page.is_visible("#empty")
        page.fill("#max-tokens", "2")
        send(page, "Hi")
        answer(page, 0)
        assert [msg["role"] for msg in bodies[2]["messages"]] == ["system", "user"]
    check_engine_idle(server.engine)


def test_stop_aborts_the_request(browser: Browser, server: Server) -> None:
    before = server.metrics()("tokenmill_request_success_total", finished_reason="abort")

    def no_eos(route: Route) -> None:  # a long answer whatever the model says
        body = route.request.post_data_json
        route.continue_(post_data=json.dumps({**body, "ignore_eos": True}))

    with open_page(browser) as (page, _):
        load(page, server)
        page.route("**/v1/chat/completions", no_eos)
        page.fill("#max-tokens", "4000")
        send(page, "Tell me a long story.")
        assert page.is_visible("#stop") and not page.is_visible("#send")
        page.wait_for_function(
            "() => document.querySelector('.msg.assistant .content').textContent.length > 40"
        )
        page.click("#stop")
        stopped = answer(page, 0, "stopped")
        assert stopped.locator(".meta").inner_text().startswith("stopped")
        assert page.is_visible("#send") and not page.is_visible("#stop")
        server.wait_idle(timeout=10)  # 4000 tokens would take minutes: it was aborted
        check_engine_idle(server.engine)
        after = server.metrics()("tokenmill_request_success_total", finished_reason="abort")
        assert after == before + 1


def sse_body(*events: dict[str, Any]) -> str:
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def delta(text: str) -> dict[str, Any]:
    return {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}}],
    }


XSS = [
    "Here: <scr",
    "ipt>window.__xss=1</script> and <img src=x ",
    'onerror="window.__xss=1"> then ```html\n<img src=y onerror="window.__xss=1">\n```',
    " and `<b>code</b>` **<i>bold</i>** <iframe src=javascript:window.__xss=1></iframe>",
]


@pytest.mark.parametrize("bypass_csp", [False, True], ids=["csp", "no-csp"])
def test_model_text_is_never_markup(browser: Browser, server: Server, bypass_csp: bool) -> None:
    """The answer is attacker-chosen (the request is answered in the browser): no markup in it
    runs, even with the page's Content-Security-Policy switched off, and it reads as text."""
    usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
             "prompt_tokens_details": {"cached_tokens": 2}}  # fmt: skip
    body = sse_body(*map(delta, XSS), {"choices": [], "usage": usage})
    with open_page(browser, bypass_csp=bypass_csp) as (page, _):
        page.route(
            "**/v1/chat/completions",
            lambda route: route.fulfill(body=body, content_type="text/event-stream"),
        )
        load(page, server)
        send(page, '<img src=x onerror="window.__xss=2">')
        content = answer(page, 0).locator(".content")
        time.sleep(0.2)  # give an image error handler time to fire, if one were there
        assert page.evaluate("typeof window.__xss") == "undefined"
        assert page.locator("#thread :is(img, script, iframe, b, i)").count() == 0
        text = content.inner_text()
        assert '<script>window.__xss=1</script> and <img src=x onerror="window.__xss=1">' in text
        assert '<img src=y onerror="window.__xss=1">' in content.locator("pre").inner_text()
        assert content.locator("code").nth(1).inner_text() == "<b>code</b>"
        assert content.locator("strong").inner_text() == "<i>bold</i>"
        assert page.locator(".msg.user .content").inner_text().startswith("<img src=x")
        assert STATS.search(page.locator(".msg.assistant .meta").inner_text())[0].startswith(
            "5 tokens"
        )


def test_errors_are_shown(browser: Browser, server: Server) -> None:
    with open_page(browser) as (page, watch):
        load(page, server)
        watch.allow("status of 400")
        page.fill("#max-tokens", "100000")  # more than the context: the server's 400
        send(page, "Hello")
        err = answer(page, 0, "error")
        assert "maximum context length" in err.inner_text()
        assert page.locator(".msg.user").first.get_attribute("class") == "msg user failed"
        assert page.input_value("#input") == "Hello"  # back in the box to retry

        # an error reported inside the stream (the engine failed after the 200)
        failure = {"error": {"message": "the engine loop failed: boom", "type": "server_error",
                             "param": None, "code": None}}  # fmt: skip
        page.route(
            "**/v1/chat/completions",
            lambda route: route.fulfill(body=sse_body(delta("Par"), failure),
                                        content_type="text/event-stream"),
        )  # fmt: skip
        page.fill("#max-tokens", "8")
        page.press("#input", "Enter")
        assert "the engine loop failed: boom" in answer(page, 1, "error").inner_text()
    check_engine_idle(server.engine)
