"""The chat page on a server with an API key: the page loads without the key, /v1/* still needs
it, and the page asks for it, keeps it for the tab and sends it as a Bearer token."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx
import pytest
from browser_utils import TIMEOUT_MS, launch_browser, open_page
from server_utils import Server, running_server

from tokenmill.engine.engine import LLMEngine

if TYPE_CHECKING:
    from playwright.sync_api import Browser

pytestmark = [pytest.mark.slow, pytest.mark.browser]

KEY = "page-key-123"


@pytest.fixture(scope="module")
def keyed(llm_engine: LLMEngine) -> Iterator[Server]:
    with running_server(llm_engine, api_key=KEY) as s:
        yield s


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with launch_browser() as b:
        yield b


def test_page_needs_no_key(keyed: Server) -> None:
    r = httpx.get(f"{keyed.url}/", timeout=30)
    assert r.status_code == 200 and "<script>" in r.text
    assert KEY not in r.text
    assert httpx.get(f"{keyed.base_url}/models", timeout=30).status_code == 401


def test_page_asks_for_the_key(browser: Browser, keyed: Server) -> None:
    from playwright.sync_api import expect

    with open_page(browser) as (page, watch):
        watch.allow("status of 401")
        auth: list[str | None] = []
        page.on(
            "request",
            lambda req: (
                auth.append(req.headers.get("authorization"))
                if req.url.endswith("/v1/chat/completions")
                else None
            ),
        )
        page.goto(f"{keyed.url}/")
        page.wait_for_selector("#key-dialog[open]")
        page.click("#key-cancel")  # dismissed: the page says why it cannot chat
        # the banner is set by the dialog's close event, a task after the click: wait for it
        expect(page.locator("#banner")).to_contain_text("needs an API key", timeout=TIMEOUT_MS)
        page.click("#key-button")
        page.wait_for_selector("#key-dialog[open]")
        page.fill("#key-input", "wrong")
        page.press("#key-input", "Enter")
        page.wait_for_selector("#key-error:not([hidden])")  # asked again
        assert "rejected" in page.inner_text("#key-error")
        page.fill("#key-input", KEY)
        page.click("#key-form button[type=submit]")
        page.wait_for_function(
            "m => document.getElementById('model').value === m", arg=keyed.model, timeout=TIMEOUT_MS
        )
        assert not page.is_visible("#key-dialog")
        assert page.evaluate("sessionStorage.getItem('tokenmill.apiKey')") == KEY
        assert page.evaluate("localStorage.getItem('tokenmill.apiKey')") is None

        page.fill("#max-tokens", "4")
        page.fill("#input", "Hi")
        page.press("#input", "Enter")
        page.wait_for_selector(".msg.assistant[data-state=done]")
        assert auth == [f"Bearer {KEY}"]

        page.reload()  # the tab keeps the key: no prompt this time
        page.wait_for_function(
            "m => document.getElementById('model').value === m", arg=keyed.model, timeout=TIMEOUT_MS
        )
        assert not page.is_visible("#key-dialog")
