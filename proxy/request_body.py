"""Reading a client's request body: hold it when small, stream it when large.

A held body can be replayed (a retry on another backend of the same version) and
read for a session id or a JSON-mode flag; a streamed one cannot, so the choice is
made once, by size, before anything is sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import aiohttp
    from aiohttp import web

    from proxy.upstream import Body

_STREAM_CHUNK = 64 * 1024


@dataclass(slots=True)
class RequestBody:
    data: bytes | None  # the whole body, when it was small enough to hold
    stream: Body  # what to send upstream
    content_length: int | None

    @property
    def replayable(self) -> bool:
        return self.data is not None or self.stream is None


async def read_body(request: web.BaseRequest, limit: int) -> RequestBody:
    """Hold bodies of up to ``limit`` bytes; larger ones stream on, unreplayable."""
    length = request.content_length
    if not request.body_exists:
        return RequestBody(data=b"", stream=None, content_length=None)
    if length is not None and length > limit:
        return RequestBody(None, _chain(b"", request.content), length)
    parts: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await request.content.readany()
        if not chunk:
            return RequestBody(data=b"".join(parts), stream=None, content_length=None)
        parts.append(chunk)
        size += len(chunk)
    # Larger than we hold (and of undeclared length): stream what we have and the rest.
    return RequestBody(None, _chain(b"".join(parts), request.content), length)


async def _chain(prefix: bytes, rest: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    if prefix:
        yield prefix
    async for chunk in rest.iter_chunked(_STREAM_CHUNK):
        yield chunk
