"""Headless Chromium for the chat page's tests: Playwright's Python driver over the system's
chromium (Debian's `chromium` package; `playwright install` is never needed). Without a browser
the tests skip, except in CI (CI=true), where a missing browser fails them: `make test` installs
chromium where it can.

The page's Content-Security-Policy forbids eval: `page.wait_for_function` needs a function
(`"() => ..."`), since a bare expression string is eval'd in the page and refused."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Page

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
TIMEOUT_MS = 30_000


def find_chromium() -> str | None:
    """TOKENMILL_CHROMIUM, else the first chromium-like executable on PATH."""
    for name in (os.environ.get("TOKENMILL_CHROMIUM"), *CHROMIUM_NAMES):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def _missing(reason: str) -> NoReturn:
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"{reason}: CI must run the browser tests", pytrace=False)
    pytest.skip(reason)


@contextmanager
def launch_browser() -> Iterator[Browser]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed (pip install -e '.[test]')")
    path = find_chromium()
    if path is None:
        _missing("no chromium found (apt-get install chromium, or set TOKENMILL_CHROMIUM)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, headless=True)
        try:
            yield browser
        finally:
            browser.close()


class PageWatch:
    """Collects the page's uncaught errors and console errors (a CSP violation is one);
    `allow(text)` accepts console errors containing text (an expected 4xx resource load)."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        self.allowed: list[str] = []
        page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        page.on("console", self._on_console)

    def _on_console(self, msg: ConsoleMessage) -> None:
        if msg.type == "error":
            self.errors.append(f"console error: {msg.text}")

    def allow(self, text: str) -> None:
        self.allowed.append(text)

    def check(self) -> None:
        bad = [e for e in self.errors if not any(a in e for a in self.allowed)]
        assert not bad, bad


@contextmanager
def open_page(browser: Browser, **context_args: Any) -> Iterator[tuple[Page, PageWatch]]:
    """A fresh context (own storage) and page; on the way out, no unexpected page errors."""
    context = browser.new_context(**context_args)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    watch = PageWatch(page)
    try:
        yield page, watch
        watch.check()
    finally:
        context.close()
