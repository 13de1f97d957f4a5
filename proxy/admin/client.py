"""A minimal blocking client of the admin API, for the ``pinproxy`` command line.

Standard library only (the CLI makes one request and exits). Errors come back as
``AdminRequestError`` with a one-line message; the token is sent, never shown.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote, urlencode

import orjson


class AdminRequestError(Exception):
    """The admin API could not be reached, or answered with an error."""


def get_session(
    admin_url: str,
    session_id: str,
    *,
    token: str | None = None,
    limit: int | None = None,
    timeout_s: float = 10.0,
) -> dict[str, Any]:
    """``GET /admin/sessions/{session_id}`` as a dict."""
    # safe="": a "/" in a session id must not become a path separator.
    url = f"{admin_url.rstrip('/')}/admin/sessions/{quote(session_id, safe='')}"
    if limit is not None:
        url += "?" + urlencode({"limit": limit})
    document = _get_json(url, token, timeout_s)
    if document.get("session_id") != session_id or not isinstance(document.get("trail"), list):
        raise AdminRequestError(f"{admin_url} is not a pinproxy admin API: {_NOT_ADMIN}")
    return document


_NOT_ADMIN = "it did not answer with a session document"
# The data plane stamps every answer it relays with these; the admin API never does.
_DATA_PLANE_HEADERS = ("X-Served-By", "X-Prompt-Version")


def _not_the_data_port(url: str, headers: Any) -> None:
    served_by = next((headers[h] for h in _DATA_PLANE_HEADERS if headers.get(h)), None)
    if served_by is not None:
        raise AdminRequestError(
            f"{url} is pinproxy's data port, not its admin API (the request was proxied "
            "to a backend); use --admin with the admin listener's URL (admin.host and "
            "admin.port, by default http://127.0.0.1:9901)"
        )


def _get_json(url: str, token: str | None, timeout_s: float) -> dict[str, Any]:
    if not url.startswith(("http://", "https://")):
        raise AdminRequestError(f"the admin URL must start with http:// or https://: {url}")
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, headers=headers, method="GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            _not_the_data_port(url, response.headers)
            body = response.read()
    except urllib.error.HTTPError as exc:
        _not_the_data_port(url, exc.headers)
        raise AdminRequestError(_describe_error(exc.code, exc.read())) from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AdminRequestError(f"cannot reach the admin API at {url}: {reason}") from exc
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise AdminRequestError(f"the admin API at {url} did not answer JSON") from exc
    if not isinstance(document, dict):
        raise AdminRequestError(f"the admin API at {url} answered unexpected JSON")
    return document


def _describe_error(status: int, body: bytes) -> str:
    try:
        error = orjson.loads(body).get("error", {})
        return f"{status} {error.get('type', 'error')}: {error.get('message', '')}".rstrip(": ")
    except (orjson.JSONDecodeError, AttributeError):
        return f"{status}: the admin API answered an error"
