"""What the upstream client writes: where a request goes and its bytes on the wire.

The head keeps the client's header bytes (non-UTF-8 ones pass through by
``surrogateescape``); the proxy adds only ``Host`` and the body's framing:
- a held body gets ``Content-Length``, except that methods which anticipate no content
  send none for an empty body (RFC 9110 §8.6: no ``Content-Length: 0`` on a GET), while
  POST, PUT, PATCH and DELETE keep ``0``, as the client's own would;
- a streamed body keeps the ``Content-Length`` the client declared, else it goes
  ``Transfer-Encoding: chunked``, one chunk per piece as it arrives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

from proxy.core.errors import BadRequest

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, AsyncIterator, Mapping

_NO_CONTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_LAST_CHUNK: Final = b"0\r\n\r\n"

Origin = tuple[str, str, int]  # scheme, host, port


class Target:
    """Where a backend base URL sends requests: origin, Host header and path prefix."""

    __slots__ = ("host_header", "origin", "prefix")

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        scheme = parts.scheme
        host = parts.hostname or ""
        default = 443 if scheme == "https" else 80
        port = parts.port or default
        self.origin: Origin = (scheme, host, port)
        shown = f"[{host}]" if ":" in host else host
        self.host_header = shown if port == default else f"{shown}:{port}"
        self.prefix = parts.path.rstrip("/")

    def __repr__(self) -> str:
        return f"Target({self.origin!r}, prefix={self.prefix!r})"


def _head(method: str, target: str, host: str, headers: Mapping[str, str]) -> list[str]:
    parts = [method, " ", target, " HTTP/1.1\r\nHost: ", host, "\r\n"]
    for name, value in headers.items():
        parts += (name, ": ", value, "\r\n")
    return parts


def _encode(parts: list[str]) -> bytes:
    # surrogateescape: header bytes that were not UTF-8 go out as they came in.
    return "".join(parts).encode("utf-8", "surrogateescape")


def request_bytes(
    method: str, target: str, host: str, headers: Mapping[str, str], body: bytes
) -> bytes:
    """A request with a held body as written on the wire: head, then the body."""
    parts = _head(method, target, host, headers)
    if body or method not in _NO_CONTENT_METHODS:
        parts += ("Content-Length: ", str(len(body)), "\r\n")
    parts.append("\r\n")
    return _encode(parts) + body


def streamed_head(
    method: str, target: str, host: str, headers: Mapping[str, str]
) -> tuple[bytes, int | None]:
    """The head of a request whose body streams, and the body's declared length.

    A ``Content-Length`` among ``headers`` (the client's declaration) is kept, and the
    body must then be exactly that long; without one the body goes chunked (None).
    """
    declared: int | None = None
    for name, value in headers.items():
        if name.lower() == "content-length":
            declared = int(value)
    parts = _head(method, target, host, headers)
    if declared is None:
        parts.append("Transfer-Encoding: chunked\r\n")
    parts.append("\r\n")
    return _encode(parts), declared


async def framed_body(body: AsyncIterable[bytes], declared: int | None) -> AsyncIterator[bytes]:
    """A streamed body's bytes as written: each piece raw under a ``declared`` length,
    else as one chunk (an empty piece is skipped: it would end the body), then the last.

    A body longer or shorter than it declared raises ``BadRequest`` (a stream the edge
    passed should never be; the connection it was written to is then closed).
    """
    sent = 0
    async for data in body:
        if not data:
            continue
        sent += len(data)
        if declared is None:
            yield b"%x\r\n%s\r\n" % (len(data), data)
            continue
        if sent > declared:
            raise BadRequest("malformed request: the body is longer than its Content-Length",
                             code="bad_http_request")
        yield data
    if declared is None:
        yield _LAST_CHUNK
    elif sent != declared:
        raise BadRequest("malformed request: the body ended before its Content-Length",
                         code="bad_http_request")
