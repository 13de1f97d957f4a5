"""The seam between the data port's HTTP server and its handler: one ``Exchange``.

An exchange is one request and the answer to it, as the handler (health.py, plane.py,
relay.py, request_body.py) sees them: the request's head, its body read chunk by
chunk, and a writer for the answer — whole (``respond``: head and body in one write)
or streamed (``start``, ``write`` per chunk, ``finish``). The data port's server
(h1_server.py, on httptools) implements it directly; nothing of aiohttp's request or
response types crosses the seam, so the handler does not depend on which HTTP server
parsed the bytes.

The framing of an answer is decided here, as pure functions of the request and the
head (``header_lines``, ``body_framing``, ``response_head``), so the server only writes
bytes.
"""

from __future__ import annotations

from enum import Enum
from http import HTTPStatus
from typing import TYPE_CHECKING, Final, Protocol

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from multidict import CIMultiDictProxy


class Exchange(Protocol):
    """One request and its answer (see the module docstring)."""

    @property
    def method(self) -> str:
        """The request method, as sent (upper case for every method proxied)."""

    @property
    def target(self) -> str:
        """The request target as sent: a path (origin form), or an absolute URL, ``*``..."""

    @property
    def path(self) -> str:
        """The target's path, percent-decoded (what health paths are matched against)."""

    @property
    def raw_path_qs(self) -> str:
        """The target's path and query exactly as sent: what goes upstream."""

    @property
    def version(self) -> tuple[int, int]:
        """The request's HTTP version, e.g. ``(1, 1)``."""

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        """The request's headers, in order, repeated names kept."""

    @property
    def cookies(self) -> Mapping[str, str]:
        """The request's ``Cookie`` header, parsed."""

    @property
    def remote(self) -> str | None:
        """The peer's IP address (the socket's, never a header's)."""

    @property
    def local(self) -> tuple[str, int] | None:
        """The address and port the connection was accepted on."""

    @property
    def tls(self) -> bool:
        """Whether the connection is TLS."""

    @property
    def content_length(self) -> int | None:
        """The declared body length (None: none declared, or chunked)."""

    @property
    def body_exists(self) -> bool:
        """Whether the request has a body at all (declared non-empty, or chunked)."""

    async def read_chunk(self) -> bytes:
        """The next piece of the body as it arrived; ``b""`` at its end. Raises the
        edge's ``ProxyError`` when the body is refused (too large, bad framing)."""

    async def send_continue(self) -> None:
        """Write the interim ``100 Continue`` (not part of the answer)."""

    @property
    def response_started(self) -> bool:
        """Whether part of the answer left: nothing else can be answered then."""

    async def respond(
        self, status: int, headers: Iterable[tuple[str, str]], body: bytes,
        reason: str | None = None,
    ) -> None:
        """Answer with ``body`` whole: head and body in one write."""

    async def start(
        self, status: int, headers: Iterable[tuple[str, str]], reason: str | None = None
    ) -> None:
        """Write the head of an answer whose body follows with ``write``."""

    async def write(self, chunk: bytes) -> None:
        """Write a piece of the body; waits only while the client's socket is full."""

    def write_nowait(self, chunk: bytes) -> bool:
        """Write a piece of the body now; True when the client's socket is full, and
        the caller must ``await drain()`` before writing more (flow control)."""

    async def drain(self) -> None:
        """Wait until the client's socket takes more (after ``write_nowait`` said so)."""

    async def finish(self) -> None:
        """End the body (the last chunk of a chunked answer)."""

    def abort(self) -> None:
        """Cut the connection off: the answer is incomplete, and the client must see so."""


# --- framing (pure) ---------------------------------------------------------------------


class Framing(Enum):
    """How an answer's body is delimited on the wire."""

    NONE = "none"  # no body may follow (HEAD, 1xx, 204, 304)
    LENGTH = "length"  # Content-Length
    CHUNKED = "chunked"  # Transfer-Encoding: chunked (HTTP/1.1)
    CLOSE = "close"  # read until the connection closes (HTTP/1.0, no length)


_NO_BODY_STATUSES: Final = frozenset({204, 304})


def body_framing(
    method: str,
    status: int,
    version: tuple[int, int],
    declared: str | None,
    body_length: int | None,
) -> tuple[Framing, int | None]:
    """How to delimit an answer, and the ``Content-Length`` its head carries (None: none).

    ``declared``: the Content-Length among the handler's headers (a backend's, relayed
    as is); ``body_length``: a whole body's length (None: the body streams). A whole
    body without a declared length gets its own; an answer to HEAD keeps what the
    backend declared (or the empty body's 0); 1xx, 204 and 304 carry none.
    """
    if status < 200 or status in _NO_BODY_STATUSES:
        return Framing.NONE, None
    length = int(declared) if declared is not None and declared.isdigit() else None
    if length is None:
        length = body_length
    if method == "HEAD":
        return Framing.NONE, length
    if length is not None:
        return Framing.LENGTH, length
    return (Framing.CHUNKED if version >= (1, 1) else Framing.CLOSE), None


def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")


STATUS_LINES: Final = {status: _status_line(status) for status in range(100, 600)}

# Headers the server itself sets on every answer: any the handler passes are replaced.
_SERVER_SET: Final = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "server", "content-length"}
)


def header_lines(headers: Iterable[tuple[str, str]]) -> tuple[list[str], str | None]:
    """The handler's headers as head lines, minus those the server sets itself, and the
    first ``Content-Length`` among them (``body_framing``'s ``declared``).

    One pass that lowers each name once: the answer's head is written from these.
    """
    lines: list[str] = []
    declared: str | None = None
    for name, value in headers:
        lowered = name.lower()
        if lowered not in _SERVER_SET:
            lines.append(f"{name}: {value}\r\n")
        elif declared is None and lowered == "content-length":
            declared = value
    return lines, declared


def response_head(
    status: int,
    reason: str | None,
    lines: list[str],
    *,
    framing: Framing,
    content_length: int | None,
    keep_alive: bool,
    http10: bool = False,
    banner: str = "",
) -> bytes:
    """The bytes of an answer's head (``body_framing`` decides the framing and length).

    ``lines``: the handler's headers, from ``header_lines`` (extended here).
    ``http10``: the request was HTTP/1.0, whose connections close unless the answer
    says keep-alive. ``banner``: the ``Server`` header, none when empty.
    """
    if reason is None or not reason.isprintable():
        line = STATUS_LINES.get(status) or f"HTTP/1.1 {status} \r\n".encode("latin-1")
    else:
        line = f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1", "replace")
    parts = lines
    if content_length is not None:
        parts.append(f"Content-Length: {content_length}\r\n")
    if framing is Framing.CHUNKED:
        parts.append("Transfer-Encoding: chunked\r\n")
    if banner:
        parts.append(f"Server: {banner}\r\n")
    if not keep_alive or framing is Framing.CLOSE:
        parts.append("Connection: close\r\n")
    elif http10:
        parts.append("Connection: keep-alive\r\n")  # HTTP/1.0 closes unless told
    parts.append("\r\n")
    return line + "".join(parts).encode("utf-8", "surrogateescape")


def chunk(data: bytes) -> bytes:
    """One piece of a chunked body, framed (never empty: an empty chunk ends the body)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK: Final = b"0\r\n\r\n"
