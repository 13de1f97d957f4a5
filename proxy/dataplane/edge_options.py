"""What each listener's edge is configured with, and the hook that sets its banner.

``EdgeOptions`` is one listener's view of the settings (the data port's ``listen``
section, the admin port's ``admin`` one); ``bannered`` wraps a request factory so
that every response's ``Server`` header is the configured one, or none.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import hdrs
from aiohttp.http import StreamWriter

if TYPE_CHECKING:
    import asyncio

    from multidict import CIMultiDict

    from proxy.config.settings import Settings


@dataclass(frozen=True, slots=True)
class EdgeOptions:
    """One listener's limits (see ListenConfig); ``name`` labels its metrics."""

    name: str
    head_timeout_s: float
    keepalive_timeout_s: float
    max_connections: int
    max_connections_per_ip: int
    retry_after_s: int
    max_head_bytes: int
    max_body_bytes: int  # 0: no limit
    server_header: str  # "": none

    @classmethod
    def data_port(cls, settings: Settings) -> EdgeOptions:
        listen = settings.listen
        return cls(
            name="data",
            head_timeout_s=listen.request_head_timeout_s,
            keepalive_timeout_s=listen.keepalive_timeout_s,
            max_connections=listen.max_connections,
            max_connections_per_ip=listen.max_connections_per_ip,
            retry_after_s=settings.routing.retry_after_s,
            max_head_bytes=listen.max_request_head_bytes,
            max_body_bytes=listen.max_request_body_bytes,
            server_header=listen.server_header,
        )

    @classmethod
    def admin_port(cls, settings: Settings) -> EdgeOptions:
        data = cls.data_port(settings)
        return dataclasses.replace(
            data,
            name="admin",
            max_connections=settings.admin.max_connections,
            max_connections_per_ip=0,
            # Admin bodies are small JSON documents, read whole under aiohttp's own
            # client_max_size (1 MiB, answered 413).
            max_body_bytes=0,
        )

    @classmethod
    def metrics_port(cls, settings: Settings) -> EdgeOptions:
        """The separate metrics listener (``metrics.port``): the admin listener's limits."""
        return dataclasses.replace(cls.admin_port(settings), name="metrics")


def bannered(make: Any, banner: str, loop: asyncio.AbstractEventLoop) -> Any:
    """``make`` (an aiohttp request factory) giving each response a writer that sets
    the ``Server`` header to ``banner``, or drops it when empty: aiohttp adds its name
    and version to every answer, and a backend's own banner is replaced too.

    aiohttp has a writer made for each request already; the one it made is let go of
    for one built with the public ``on_headers_sent`` hook.
    """

    async def on_headers(headers: CIMultiDict[str]) -> None:
        if banner:
            headers[hdrs.SERVER] = banner
        else:
            headers.popall(hdrs.SERVER, None)

    def factory(message: Any, payload: Any, protocol: Any, _writer: Any, task: Any) -> Any:
        writer = StreamWriter(protocol, loop, on_headers_sent=on_headers)
        return make(message, payload, protocol, writer, task)

    return factory
