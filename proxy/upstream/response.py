"""A backend's response as the upstream client hands it over (its head; the body on demand)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

    from multidict import CIMultiDictProxy


class Exchange(Protocol):
    """What a response reads its body through: its connection (http1.Connection)."""

    async def read_chunk(self) -> bytes: ...
    def take_chunk(self) -> bytes | None: ...
    def arrival(self) -> asyncio.Future[None]: ...
    def stream_to(self, sink: Callable[[bytes], bool] | None) -> None: ...
    def whole_body(self) -> bytes | None: ...
    def finish(self, *, reuse: bool) -> None: ...


class Http1Response:
    """A response whose head is in; the body is read with ``read_chunk``."""

    __slots__ = ("_conn", "content_type", "headers", "reason", "status")

    def __init__(self, conn: Exchange, status: int, reason: str,
                 headers: CIMultiDictProxy[str]) -> None:
        self._conn = conn
        self.status = status
        self.reason = reason
        self.headers = headers
        content_type = headers.get("Content-Type")
        self.content_type = (
            "application/octet-stream"
            if content_type is None
            else content_type.partition(";")[0].strip().lower()
        )

    async def read_chunk(self) -> bytes:
        """The next part of the body (all that has arrived); ``b""`` at its end."""
        return await self._conn.read_chunk()

    def take_chunk(self) -> bytes | None:
        """What has arrived of the body, without waiting: ``b""`` at its end, None when
        nothing has yet (then await ``arrival()`` and ask again)."""
        return self._conn.take_chunk()

    def arrival(self) -> asyncio.Future[None]:
        """Done when more of the body arrives, it ends or it fails (see ``take_chunk``)."""
        return self._conn.arrival()

    def stream_to(self, sink: Callable[[bytes], bool] | None) -> None:
        """While set, hand each piece of the body to ``sink`` as it arrives, unbuffered;
        ``sink`` returns False to stop (see ``http1.Connection.stream_to``)."""
        self._conn.stream_to(sink)

    def whole_body(self) -> bytes | None:
        """The whole body when all of it has already arrived (then read), else None.

        None for an answer to HEAD: its framing headers describe a body it never has,
        and are relayed as they are rather than recomputed for an empty one.
        """
        return self._conn.whole_body()

    def release(self) -> None:
        """Done with a fully read response: the connection may serve another request."""
        self._conn.finish(reuse=True)

    def close(self) -> None:
        """Done before the end (or after an error): the connection is closed."""
        self._conn.finish(reuse=False)

    def __repr__(self) -> str:
        return f"Http1Response({self.status}, {self._conn!r})"
