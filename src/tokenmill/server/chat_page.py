"""GET /: the chat page, one static file of HTML, CSS and vanilla JS (no CDN, no build step).

The page holds no secrets, so it is served without the API key (the guard leaves `/` open); the
page sends the key the user types on its own /v1 requests. Its Content-Security-Policy allows
exactly the page's inline script and style (by hash) and requests to its own origin: model text is
rendered as text, and even if some ever reached the DOM as markup, no injected script or event
handler could run and nothing could be sent elsewhere.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib import resources

from fastapi import FastAPI
from starlette.responses import HTMLResponse, Response

PAGE = "static/chat.html"


def _source_hashes(html: str, tag: str) -> str:
    bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    assert bodies, f"the chat page has no inline <{tag}>"
    digests = (hashlib.sha256(b.encode()).digest() for b in bodies)
    return " ".join(f"'sha256-{base64.b64encode(d).decode()}'" for d in digests)


@cache
def page() -> tuple[bytes, dict[str, str]]:
    """The page's bytes and response headers (read once from the package data)."""
    html = resources.files("tokenmill.server").joinpath(PAGE).read_text(encoding="utf-8")
    csp = "; ".join(
        [
            "default-src 'none'",
            f"script-src {_source_hashes(html, 'script')}",
            f"style-src {_source_hashes(html, 'style')}",
            "connect-src 'self'",
            "img-src data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    headers = {
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }
    return html.encode(), headers


def add_chat_page(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def chat_page() -> Response:
        body, headers = page()
        return HTMLResponse(body, headers=headers)
