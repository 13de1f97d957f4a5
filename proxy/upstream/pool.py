"""The keep-alive connection pool of pinproxy's HTTP/1.1 client to backends (http1.py).

Per backend origin, idle connections wait oldest first; a request takes the oldest one
that has been quiet for ``reuse_quiet_s`` (see http1.py on stray responses) or opens a
new one within ``pool_size`` (and ``pool_size_per_host``), evicting an idle connection
of another origin at the total limit; with no room left it takes a younger idle
connection of its origin rather than wait, else it waits for a slot.
Host names are resolved at most every ``_DNS_TTL_S`` and each address is tried in turn.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections import deque
from typing import TYPE_CHECKING, Final

from proxy.core.errors import UpstreamConnectError, UpstreamDropped
from proxy.upstream.framing import Origin, Target, request_bytes, streamed_head
from proxy.upstream.http1 import Connection, Http1Response
from proxy.upstream.state import HeadLimits, IdleVerdict, idle_verdict, may_replay

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, Mapping

    from proxy.config.settings import UpstreamConfig

_DNS_TTL_S: Final = 10.0


class Http1Pool:
    """Keep-alive connections per backend origin, bounded like aiohttp's connector."""

    def __init__(
        self,
        config: UpstreamConfig,
        *,
        keepalive_s: float = 15.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """``tls``: how https backends are verified; by default the system's CAs."""
        self._connect_timeout_s = config.connect_timeout_s
        self._idle_timeout_s = config.read_idle_timeout_s
        self._limit = config.pool_size
        self._limit_per_origin = config.pool_size_per_host
        self._keepalive_s = keepalive_s
        self._quiet_s = config.reuse_quiet_ms / 1000
        self._head_limits = HeadLimits.from_config(config)
        self._idle: dict[Origin, deque[Connection]] = {}
        self._open: dict[Origin, int] = {}
        self._total = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._connections: set[Connection] = set()
        self._addresses: dict[str, tuple[float, tuple[str, ...]]] = {}
        self._ssl = tls
        self._closed = False

    async def request(
        self,
        target: Target,
        method: str,
        path_qs: str,
        headers: Mapping[str, str],
        body: bytes | AsyncIterable[bytes] | None,
        *,
        replayable: bool = False,
    ) -> Http1Response:
        """Send one request; return once the response head is in. The caller finishes it.

        ``body``: held (``bytes``; None is an empty one) or streamed from an async
        iterable (framing.py says how each is framed; http1.py how a stream is written).
        ``replayable``: the request may be written again (idempotent method or an
        Idempotency-Key), so a held one that fails on a pooled connection the backend
        had closed is retried once on a fresh one (``state.may_replay``); otherwise
        that is the caller's ``UpstreamDropped``. Nothing of a streamed body is read
        before a connection is established.
        """
        path = target.prefix + path_qs
        stream: AsyncIterable[bytes] | None = None
        declared: int | None = None
        if isinstance(body, bytes) or body is None:
            payload = request_bytes(method, path, target.host_header, headers, body or b"")
        else:
            stream = body
            payload, declared = streamed_head(method, path, target.host_header, headers)
        # The usual case, an idle connection ready, needs no coroutine of _acquire's.
        conn = self._take_idle(target.origin, self._quiet_s) or await self._acquire(target.origin)
        for fresh in (False, True):
            try:
                if stream is None:
                    conn.send(payload, head_only=method == "HEAD")
                else:
                    conn.send_streamed(payload, stream, declared)
                return await conn.read_head()
            except UpstreamDropped:
                conn.abort()
                if fresh or not may_replay(
                    replayable=replayable, streamed=stream is not None, reused=conn.reused,
                    got_bytes=conn.got_bytes,
                ):
                    raise
            except BaseException:
                conn.abort()
                raise
            # The backend had most likely closed this idle connection before our request
            # reached it; it is a replay all the same, hence only for replayable requests.
            conn = await self._acquire(target.origin, fresh=True)
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def close(self) -> None:
        """Close every connection, idle or not; later requests fail."""
        self._closed = True
        for conn in list(self._connections):
            conn.abort()
        self._idle.clear()

    # --- connections ---------------------------------------------------------------

    async def _acquire(self, origin: Origin, *, fresh: bool = False) -> Connection:
        while True:
            if not fresh and (conn := self._take_idle(origin, self._quiet_s)) is not None:
                return conn
            if self._has_room(origin):
                break
            if not fresh and (conn := self._take_idle(origin, 0.0)) is not None:
                return conn  # no room for a new one: a younger idle one beats waiting
            if self._evict_idle():
                break
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if not waiter.done():
                    waiter.cancel()
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        return await self._connect(origin)

    def _take_idle(self, origin: Origin, quiet_s: float) -> Connection | None:
        """The oldest idle connection of ``origin`` quiet for ``quiet_s``; closes expired ones."""
        idle = self._idle.get(origin)
        if not idle:
            return None
        now = asyncio.get_running_loop().time()
        while idle:
            conn = idle[0]
            verdict = idle_verdict(
                usable=conn.usable(), age_s=now - conn.idle_since,
                keepalive_s=self._keepalive_s, quiet_s=quiet_s,
            )
            if verdict is IdleVerdict.TOO_YOUNG:
                return None  # the oldest is too young, so are all the others
            idle.popleft()
            conn.pooled = False
            if verdict is IdleVerdict.LEND:
                return conn
            conn.abort()
        return None

    def _has_room(self, origin: Origin) -> bool:
        if self._total >= self._limit:
            return False
        return not self._limit_per_origin or self._open.get(origin, 0) < self._limit_per_origin

    def _evict_idle(self) -> bool:
        # At the total limit an idle connection elsewhere is worth less than a request.
        if self._total < self._limit:
            return False
        for idle in self._idle.values():
            if idle:
                conn = idle.popleft()
                conn.pooled = False
                conn.abort()
                return True
        return False

    async def _connect(self, origin: Origin) -> Connection:
        if self._closed:
            raise UpstreamConnectError("the upstream pool is closed")
        scheme, host, port = origin
        self._total += 1
        self._open[origin] = self._open.get(origin, 0) + 1
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                tls = self._tls() if scheme == "https" else None
                addresses = await self._resolve(host, port)
                for number, address in enumerate(addresses, 1):
                    try:
                        _, conn = await loop.create_connection(
                            lambda: Connection(
                                self, origin, self._idle_timeout_s, self._head_limits
                            ),
                            address, port, ssl=tls, server_hostname=host if tls else None,
                        )
                        break
                    except OSError:
                        # Like aiohttp: each address in turn (say ::1 first, backend on IPv4).
                        if number == len(addresses):
                            raise
        except TimeoutError as exc:
            self._release_slot(origin)
            raise UpstreamConnectError("connecting to the backend timed out") from exc
        except OSError as exc:
            self._release_slot(origin)
            reason = exc.strerror or type(exc).__name__
            raise UpstreamConnectError(f"connection to the backend failed: {reason}") from exc
        except BaseException:
            self._release_slot(origin)
            raise
        self._connections.add(conn)
        return conn

    async def _resolve(self, host: str, port: int) -> tuple[str, ...]:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return (host,)
        loop = asyncio.get_running_loop()
        cached = self._addresses.get(host)
        if cached is not None and cached[0] > loop.time():
            return cached[1]
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            raise OSError(f"no address for {host}")
        self._addresses[host] = (loop.time() + _DNS_TTL_S, addresses)
        return addresses

    def _tls(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    # --- called by connections -----------------------------------------------------

    def put_idle(self, conn: Connection) -> None:
        if self._closed:
            conn.abort()
            return
        idle = self._idle.get(conn.origin)
        if idle is None:
            idle = self._idle[conn.origin] = deque()
        conn.pooled = True
        idle.append(conn)
        self._wake_waiters()

    def forget(self, conn: Connection) -> None:
        if conn in self._connections:
            self._connections.discard(conn)
            self._release_slot(conn.origin)
        if conn.pooled:
            conn.pooled = False
            self._idle[conn.origin].remove(conn)

    def _release_slot(self, origin: Origin) -> None:
        self._total -= 1
        left = self._open.get(origin, 1) - 1
        if left:
            self._open[origin] = left
        else:
            self._open.pop(origin, None)
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def __repr__(self) -> str:
        idle = sum(len(v) for v in self._idle.values())
        return f"Http1Pool(open={self._total}, idle={idle}, limit={self._limit})"
