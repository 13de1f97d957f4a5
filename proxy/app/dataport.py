"""The data port: one handler for every request, served by pinproxy's own HTTP server.

Every data-port request goes to the same handler, so a URL dispatcher, match info and
a middleware chain would only cost time. The port is served by
:class:`~proxy.dataplane.h1_server.H1Server` (an asyncio protocol on httptools, with
the edge's limits), which hands each request to ``data_port_handler`` as an
:class:`~proxy.dataplane.exchange.Exchange`; aiohttp serves the admin listener only.

The port has one error boundary (proxy/dataplane/boundary.py), the data plane's: it
answers whatever the data plane raises, and whatever the front door here raises (an
unknown ``Expect``, a target that is no path, a bug in a health check), in the OpenAI
error shape, never with a traceback.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from proxy.core.edge_limits import method_refusal, target_refusal
from proxy.core.errors import ExpectationFailed, PathNotServed, ProxyError
from proxy.dataplane.edge_options import EdgeOptions
from proxy.dataplane.exchange import Exchange
from proxy.dataplane.h1_server import H1Server
from proxy.dataplane.health import HealthEndpoints
from proxy.dataplane.relay import respond_error

if TYPE_CHECKING:
    from proxy.app.services import Services

Handler = Callable[[Exchange], Awaitable[None]]


def data_port_handler(services: Services) -> Handler:
    """The handler of every data-port request: TRACE, TRACK and absolute-form targets
    naming another authority are refused; then the health endpoints, else the data
    plane."""
    settings = services.settings
    health = HealthEndpoints(
        registry=services.registry, store=lambda: services.store, drain=services.drain
    )
    health_path, ready_path = settings.listen.health_path, settings.listen.ready_path
    listen_host = settings.listen.host
    dataplane, admission = services.dataplane, services.admission
    boundary = dataplane.boundary

    async def serve(request: Exchange) -> None:
        try:
            refusal = method_refusal(request.method) or _target_refusal(request, listen_host)
            if refusal is not None:
                await respond_error(request, refusal)
                return
            if request.headers.get("Expect") is not None:
                await _expect(request)
            path = request.path
            if path == health_path:
                await health.healthz(request)
                return
            if path == ready_path:
                await health.readyz(request)
                return
            if not path.startswith("/"):
                # Asterisk form (OPTIONS *) and authority form (CONNECT host:port) name
                # no resource to proxy, and a CONNECT must never open a tunnel.
                raise PathNotServed(
                    f"{request.method} {path!r}: only a path can be proxied", code="404"
                )
        except Exception as exc:
            # The data plane's boundary, which answers (and records) everything past
            # this point.
            await respond_error(request, boundary.error_for(exc, request))
            return
        # Admission control (limits.*): only proxied requests queue or are shed.
        await admission.run(request, dataplane.handle, dataplane.handle)

    return serve


def data_port_server(services: Services) -> H1Server:
    """The data port's server: ``data_port_handler`` behind the edge's limits.

    A client that disconnects cancels its handler, which closes the upstream request
    instead of generating tokens nobody will read. A request body passes byte for
    byte, its Content-Encoding with it (never inflated on the way).
    """
    return H1Server(
        data_port_handler(services),
        options=EdgeOptions.data_port(services.settings),
        metrics=services.metrics,
    )


def _target_refusal(request: Exchange, listen_host: str) -> ProxyError | None:
    """An absolute-form target not naming this proxy (edge_limits.target_refusal)."""
    target = request.target
    if target.startswith("/"):
        return None  # origin form: nearly every request, decided without a lookup
    local = request.local
    # A wildcard listen host names no authority a client could have meant.
    hosts, port = ([] if listen_host in ("0.0.0.0", "::", "") else [listen_host]), None
    if local is not None:
        hosts.append(local[0])
        port = local[1]
    return target_refusal(target, "http", hosts, port)


async def _expect(request: Exchange) -> None:
    """Answer ``Expect: 100-continue`` (RFC 9110 §10.1.1).

    A client that sent it waits for the interim answer before sending its body:
    without one the request would stall until the client gives up.
    """
    expect = request.headers.get("Expect", "")
    if request.version != (1, 1):
        return  # HTTP/1.0 has no interim answers; the client sends its body anyway
    if expect.lower() != "100-continue":
        raise ExpectationFailed(f"unknown expectation {expect!r}", code="417")
    await request.send_continue()
