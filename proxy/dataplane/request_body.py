"""Reading a client's request body, and its session id with it.

A held body can be replayed (a retry on another backend of the same version) and
read for a session id or a JSON-mode flag; a streamed one cannot, so the choice is
made once, before anything is sent.

When a body source (``sessions.sources``) must give the session id, routing needs that
id before the first byte goes upstream, so the body is read until the id is settled:
- a body of up to ``upstream.max_buffered_body_bytes`` is held whole and read as a
  backend reads it (``json_body``);
- past that, ijson scans it as it arrives (``json_scan``) while the bytes read so far
  are kept; once the id is found, the kept prefix and then the rest of the stream go
  upstream. A body that only its end can settle (no id in it, or one yajl refuses but
  Python's ``json`` reads, such as ``NaN``) is held to its end and read whole;
- a body still unsettled after ``sessions.max_scan_bytes`` is refused with 413
  ``session_id_beyond_scan_limit``, never forwarded unpinned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from proxy.core.continuation import continues_conversation
from proxy.core.edge_limits import body_too_large_error
from proxy.core.errors import BadRequest, PayloadTooLarge
from proxy.core.json_body import PENDING, BodyKind, HeldJson, Pending, body_kind
from proxy.core.json_scan import PathScanner
from proxy.policy.sessions import BodyLookup, no_json_body, resolve_session_id

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from proxy.config.settings import SessionsConfig
    from proxy.dataplane.exchange import Exchange
    from proxy.upstream.client import Body


@dataclass(slots=True)
class RequestBody:
    data: bytes | None  # the whole body, when it was small enough to hold
    stream: Body  # what to send upstream
    content_length: int | None
    _continues: bool | None = field(default=None, repr=False, compare=False)

    @property
    def replayable(self) -> bool:
        return self.data is not None or self.stream is None

    @property
    def continues(self) -> bool:
        """Whether the held body continues a conversation (proxy/core/continuation.py).

        Parsed once per request: a cache miss asks it before its lookup (may the
        store write a proposal?) and again when no pin was found (a lost pin?).
        """
        if self._continues is None:
            self._continues = continues_conversation(self.data)
        return self._continues


async def read_body(request: Exchange, limit: int, cap: int = 0) -> RequestBody:
    """Hold bodies of up to ``limit`` bytes; larger ones stream on, unreplayable, and
    fail past ``cap`` bytes (0: no cap; see ``_chain``)."""
    length = request.content_length
    if not request.body_exists:
        return RequestBody(data=b"", stream=None, content_length=None)
    if length is not None and length > limit:
        return RequestBody(None, _chain([], request, cap), length)
    parts: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await request.read_chunk()
        if not chunk:
            return RequestBody(data=b"".join(parts), stream=None, content_length=None)
        parts.append(chunk)
        size += len(chunk)
    # Larger than we hold (and of undeclared length): stream what we have and the rest.
    return RequestBody(None, _chain(parts, request, cap), length)


class SessionBodyReader:
    """Reads a request's body and its session id together (see the module docstring)."""

    def __init__(
        self, sessions: SessionsConfig, buffer_bytes: int, max_body_bytes: int = 0
    ) -> None:
        """``max_body_bytes``: ``listen.max_request_body_bytes`` (0: none)."""
        self._sources = sessions.sources
        self._paths: Sequence[str] = tuple(s.name for s in self._sources if s.kind == "body")
        self._required = sessions.required
        self._max_id_bytes = sessions.max_id_bytes
        self._buffer = buffer_bytes
        self._scan_limit = max(buffer_bytes, sessions.max_scan_bytes)
        self._cap = max_body_bytes

    async def read(self, request: Exchange) -> tuple[RequestBody, str | None]:
        """The body to send and the session id (None: unpinned); raises ``BadRequest``."""
        encoding = request.headers.get("Content-Encoding")
        kind = (
            body_kind(request.body_exists, request.headers.get("Content-Type"), encoding)
            if self._paths
            else BodyKind.NONE
        )
        lookup = (lambda _path: PENDING) if kind is BodyKind.JSON else no_json_body(kind, encoding)
        session = self._resolve(request, lookup)
        if session is PENDING:
            body, session = await self._read_json(request)
        else:
            body = await read_body(request, self._buffer, self._cap)
        if session is None and self._required:
            raise BadRequest(
                "a session id is required (see the configured session sources)",
                code="missing_session_id",
            )
        return body, session

    async def _read_json(self, request: Exchange) -> tuple[RequestBody, str | None]:
        parts: list[bytes] = []
        size = 0
        scanner: PathScanner | None = None
        while True:
            chunk = await request.read_chunk()
            if not chunk:
                data = b"".join(parts)
                held = self._resolve(request, HeldJson(data))
                assert held is not PENDING  # a whole body settles every path
                return RequestBody(data=data, stream=None, content_length=None), held
            parts.append(chunk)
            size += len(chunk)
            if size <= self._buffer:
                continue
            if scanner is None:
                scanner = PathScanner(self._paths)
                for part in parts:
                    scanner.feed(part)
            else:
                scanner.feed(chunk)
            session = self._resolve(request, scanner.result)
            if session is not PENDING:
                stream = _chain(parts, request, self._cap)
                return RequestBody(None, stream, request.content_length), session
            if size > self._scan_limit:
                raise PayloadTooLarge(
                    f"the session id could not be settled within the first {self._scan_limit}"
                    " bytes of the body (sessions.max_scan_bytes); send it in a header or"
                    " nearer the start of the body",
                    code="session_id_beyond_scan_limit",
                )

    def _resolve(self, request: Exchange, lookup: BodyLookup) -> str | Pending | None:
        return resolve_session_id(
            self._sources, request.headers, request.cookies, lookup,
            max_bytes=self._max_id_bytes,
        )


async def _chain(prefix: list[bytes], rest: Exchange, cap: int) -> AsyncIterator[bytes]:
    """``prefix``, then the rest of the body, as it streams upstream.

    The listener fails a body's reads once more than ``listen.max_request_body_bytes``
    of it arrived (h1_connection.py), but a read already woken by the bytes that crossed the
    cap still returns them; counting here keeps those from being sent: failing the
    iteration aborts the upstream request before it is complete.
    """
    sent = sum(map(len, prefix))
    prefix.reverse()
    while prefix:
        yield prefix.pop()  # each part is let go of once it is sent
    while chunk := await rest.read_chunk():
        sent += len(chunk)
        if cap and sent > cap:
            raise body_too_large_error(cap)
        yield chunk
