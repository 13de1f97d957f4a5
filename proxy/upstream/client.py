"""pinproxy's one HTTP client to the backends (``Upstream``), and aiohttp's for polls.

Every proxied request goes through the keep-alive pool of pool.py and the connection of
http1.py, whatever its method or body (held or streamed); the caller gets an
``UpstreamResponse`` and only pinproxy's own errors, translated where they arise
(http1.py for the exchange, pool.py for connecting). aiohttp's client session remains
for the control plane's ``/version`` polls only (``make_client_session``).

The client follows no redirects, decompresses nothing (bodies pass byte for byte),
keeps no cookies (a proxy must not mix users' cookies) and adds no headers beyond
``Host`` and a body's framing. Streams have no total deadline: a connect timeout bounds
reaching the backend and an idle-read timeout bounds each silence, head included.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Protocol

import aiohttp

from proxy.core.errors import UpstreamConnectError
from proxy.upstream.framing import Target

if TYPE_CHECKING:
    import asyncio
    import ssl

    from multidict import CIMultiDict, CIMultiDictProxy

    from proxy.config.settings import UpstreamConfig
    from proxy.upstream.pool import Http1Pool

Body = bytes | AsyncIterable[bytes] | None

__all__ = ["Body", "Upstream", "UpstreamConnectError", "UpstreamResponse", "make_client_session"]


class UpstreamResponse(Protocol):
    """A backend's response whose head is in. Finish it with ``release`` or ``close``."""

    @property
    def status(self) -> int: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def headers(self) -> CIMultiDictProxy[str]: ...
    @property
    def content_type(self) -> str: ...

    async def read_chunk(self) -> bytes:
        """What has arrived of the body; ``b""`` at its end. Raises ``UpstreamBodyError``."""
        ...

    def take_chunk(self) -> bytes | None:
        """What has arrived of the body, without waiting; ``b""`` at its end, None when
        nothing has yet. Raises ``UpstreamBodyError``."""
        ...

    def arrival(self) -> asyncio.Future[None]:
        """A future done when more of the body arrives, it ends or it fails."""
        ...

    def stream_to(self, sink: Callable[[bytes], bool] | None) -> None:
        """While set, each piece of the body that arrives goes to ``sink`` unbuffered
        (while nothing is buffered); ``sink`` returns False to stop, and the waiter on
        ``arrival()`` is woken then, when ``sink`` raises, and at the body's end."""
        ...

    def whole_body(self) -> bytes | None:
        """The whole body when all of it has already arrived (then read), else None."""
        ...

    def release(self) -> None: ...
    def close(self) -> None: ...


def make_client_session(
    config: UpstreamConfig, tls: ssl.SSLContext | None = None
) -> aiohttp.ClientSession:
    """aiohttp's client for the control plane's ``/version`` polls (never proxied
    requests); ``tls`` verifies https backends (the system's CAs when None)."""
    connector = aiohttp.TCPConnector(
        limit=config.pool_size,
        limit_per_host=config.pool_size_per_host,
        ttl_dns_cache=10,
        ssl=tls if tls is not None else True,
    )
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        # aiohttp would otherwise add Accept: */* and Accept-Encoding: gzip, deflate (and a
        # User-Agent, and a Content-Type guessed from the body) that the client never sent.
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        timeout=aiohttp.ClientTimeout(
            total=None,
            connect=config.connect_timeout_s,
            sock_read=config.read_idle_timeout_s,
        ),
        trust_env=False,
        # Response heads of the polls: no single line beyond the whole head's cap, no
        # more headers than allowed (the proxied requests' client checks its own).
        max_line_size=config.max_response_head_bytes,
        max_field_size=config.max_response_head_bytes,
        max_headers=config.max_response_headers,
    )


class Upstream:
    """Sends proxied requests to backends through one pool (pool.py)."""

    def __init__(self, pool: Http1Pool) -> None:
        self._pool = pool
        self._targets: dict[str, Target] = {}

    def send(
        self,
        method: str,
        base_url: str,
        path_qs: str,
        headers: Mapping[str, str] | CIMultiDict[str],
        body: Body,
        *,
        replayable: bool = False,
    ) -> Awaitable[UpstreamResponse]:
        """Send the request; the awaitable is done once the response head is in. The
        caller finishes the response. (A plain function handing back the pool's
        coroutine: no coroutine of its own on every request's path.)

        Failures are told apart by what the backend may have seen: nothing
        (``UpstreamConnectError``), the request but no head (``UpstreamDropped``), a
        broken or late head (``UpstreamError``, ``UpstreamTimeout``). A streamed body
        that fails on the client's side before the head is in raises that failure
        (the edge's ``ProxyError``, or the client's disconnection). ``replayable``
        lets a held request on a pooled connection found closed be retried once on a
        fresh one.

        ``path_qs`` is the request's own path and query, kept exactly as received. An
        empty body is sent as no body: no ``Content-Length: 0`` is added to a GET, HEAD
        or OPTIONS that had none (RFC 9110 §8.6), while methods that anticipate content
        (POST, PUT, PATCH, DELETE) keep ``0``, as the client's own would.
        """
        if not path_qs.startswith("/"):
            path_qs = "/" + path_qs
        target = self._targets.get(base_url)
        if target is None:
            target = self._targets[base_url] = Target(base_url)
        return self._pool.request(target, method, path_qs, headers, body, replayable=replayable)

    def __repr__(self) -> str:
        return f"Upstream(pool={self._pool!r})"
