"""``GET /admin/ui``: a small read-only page of the rollout picture, on the admin listener.

One static HTML file with its script and style inline (package data, no build step).
The page itself is public because it holds no data: it fetches nothing and shows
nothing until an operator enters the admin token (or opens ``/admin/ui#token=...``;
a fragment never reaches a server), and then calls the token-protected API
(``/admin/rollout``, ``/admin/sessions/{id}``) with it as a Bearer token, like any
client. A wrong token shows nothing but the error. The Content-Security-Policy allows
exactly the page's own inline script and style (by hash) and requests to this origin.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib import resources

from aiohttp import web

from proxy.admin.api import Route

PATH = "/admin/ui"


@cache
def page() -> tuple[bytes, str]:
    """The page and its Content-Security-Policy (hashes of its inline script and style)."""
    html = resources.files("proxy.admin").joinpath("static/ui.html").read_text("utf-8")

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
        return " ".join(
            f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'"
            for b in blocks
        )

    policy = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
              "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html.encode(), policy


async def _ui(request: web.Request) -> web.StreamResponse:
    body, policy = page()
    return web.Response(body=body, content_type="text/html", charset="utf-8", headers={
        "Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer", "Cache-Control": "no-store",
    })


ROUTES: tuple[Route, ...] = (
    Route("GET", PATH, _ui,
          "The operator page (HTML): regions x versions, region states, recent decisions, "
          "a session lookup. Public, but it shows and fetches nothing until the admin "
          "token is entered; its data comes from the token-protected API.",
          tags=("ui",), media_types=("text/html",), public=True),
)
