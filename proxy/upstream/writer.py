"""Writing a streamed request body into a backend connection, with write flow control.

A request body that is not held in memory is written by a task of its own while the
connection awaits the response (http1.py), piece by piece as the client's stream yields
it (framed by ``framing.framed_body``). When the transport's buffer passes its
high-water mark (``pause_writing``) the writer waits for it to drain, so a large body
is never buffered whole: it is read from the client only as fast as the backend's
socket takes it. A backend may answer before the body is all written; the writer
carries on (the backend may still read it), and the connection is closed rather than
reused if the body was cut short. A failure of the client's stream (the edge refused
the body, or the client went away) is handed to the connection, which closes.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import AsyncIterable


class BodySink(Protocol):
    """The connection a body is written into."""

    @property
    def closed(self) -> bool: ...

    def write(self, data: bytes) -> None:
        """Hand bytes to the transport."""
        ...

    def body_failed(self, exc: Exception) -> None:
        """The body could not be written to its end (the client's stream failed)."""
        ...


class BodyWriter:
    """Writes one streamed body into ``sink``; ``done`` once all of it was written."""

    __slots__ = ("_drain", "_sink", "_task", "done")

    def __init__(self, sink: BodySink, wire: AsyncIterable[bytes], *, paused: bool) -> None:
        """``wire``: the body's bytes as written; ``paused``: the transport is full now."""
        self._sink = sink
        self._drain: asyncio.Future[None] | None = None
        self.done = False
        if paused:
            self.pause()
        self._task = asyncio.get_running_loop().create_task(self._run(wire))

    def pause(self) -> None:
        """The transport's buffer is over its high-water mark: wait before writing more."""
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_future()

    def resume(self) -> None:
        """The transport drained below its low-water mark."""
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    def stop(self) -> None:
        """The connection closed: write nothing more."""
        self.resume()
        if self._task is not asyncio.current_task():
            self._task.cancel()

    async def _run(self, wire: AsyncIterable[bytes]) -> None:
        try:
            async for data in wire:
                if self._sink.closed:
                    return
                self._sink.write(data)
                if self._drain is not None:
                    await self._drain
            self.done = not self._sink.closed
        except Exception as exc:  # the client's stream failed, or its framing did
            self._sink.body_failed(exc)
