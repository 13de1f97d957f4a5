"""The data port's HTTP/1.1 server: its listening sockets, caps and shutdown.

Theory of operation. ``H1Server`` makes one ``H1Connection`` (h1_connection.py: an
``asyncio.Protocol`` on httptools, in the style of uvicorn's ``httptools_impl``) per
accepted socket; each connection turns the bytes into ``H1Exchange``s (h1_exchange.py:
a request and the writer of its answer) and hands them, one at a time and in order, to
the handler (app/dataport.py), which sees only the ``Exchange`` seam (exchange.py).
The server holds what all its connections share: the handler, the edge's options, the
connection caps (``ConnectionAdmission``), the counters (``EdgeReport``), and the count
of exchanges in flight that shutdown waits on.

Shutdown (``H1Server.shutdown``): stop accepting, close idle connections, give the
exchanges in flight ``listen.shutdown_timeout_s`` to finish (each connection closes
after its answer, which says ``Connection: close``), then close what is left.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from proxy.core.edge_limits import ConnectionAdmission
from proxy.dataplane.edge_report import EdgeReport
from proxy.dataplane.h1_connection import H1Connection

if TYPE_CHECKING:
    from proxy.dataplane.edge_options import EdgeOptions
    from proxy.dataplane.h1_connection import Handler
    from proxy.telemetry.metrics import ProxyMetrics

logger = logging.getLogger(__name__)


class H1Server:
    """The data port's connections: their handler, limits, counters and shutdown."""

    def __init__(self, handler: Handler, *, options: EdgeOptions, metrics: ProxyMetrics) -> None:
        self.handler = handler
        self.options = options
        self.report = EdgeReport(options.name, metrics)
        self.admission = ConnectionAdmission(
            options.max_connections, options.max_connections_per_ip
        )
        self.connections: set[H1Connection] = set()
        self.draining = False
        self._servers: list[asyncio.Server] = []
        self._idle = asyncio.Event()  # set while no exchange is in flight
        self._idle.set()
        self._busy = 0

    def __call__(self) -> H1Connection:
        return H1Connection(self)

    async def listen(self, host: str, port: int, *, reuse_port: bool, backlog: int) -> None:
        """Start accepting on ``host:port`` (raises ``OSError`` when it cannot bind)."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            self, host, port, reuse_port=reuse_port, backlog=backlog
        )
        self._servers.append(server)

    @property
    def addresses(self) -> list[Any]:
        """The addresses bound (socket names), as aiohttp's runner reports them."""
        return [sock.getsockname() for s in self._servers for sock in s.sockets]

    def busy(self, delta: int) -> None:
        """An exchange started (+1) or finished (-1): shutdown waits for none in flight."""
        self._busy += delta
        if not self._busy:
            self._idle.set()
        elif delta > 0 and self._busy == 1:
            self._idle.clear()  # only on the way out of idle: it stays clear while busy

    async def shutdown(self, timeout_s: float) -> None:
        """Stop accepting; let exchanges in flight finish for up to ``timeout_s``."""
        self.draining = True
        for server in self._servers:
            server.close()
        for connection in list(self.connections):
            connection.close_if_idle()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            logger.warning("shutdown: %d requests still in flight after %gs are cut off",
                           self._busy, timeout_s)
        for connection in list(self.connections):
            connection.abort()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    def __repr__(self) -> str:
        return f"H1Server({self.options.name}, {self.admission!r})"
