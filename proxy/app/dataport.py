"""The data port: one handler for every request, served by aiohttp's low-level server.

Every data-port request goes to the same handler, so aiohttp's URL dispatcher, match
info and middleware chain would only cost time (what skipping them saved:
bench/RESULTS.md). The port is therefore served by aiohttp's public
low-level server (``web.Server`` — here :class:`~proxy.dataplane.listener.EdgeServer`,
which adds the edge's limits — run by ``web.ServerRunner``), not by an application.

The port has one error boundary (proxy/dataplane/boundary.py), the data plane's: it
answers whatever the data plane raises, and whatever the front door here raises (an
unknown ``Expect``, a target that is no path, a bug in a health check), in the OpenAI
error shape, never with a traceback.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import HttpVersion11, web

from proxy.core.edge_limits import method_refusal, target_refusal
from proxy.core.errors import ExpectationFailed, PathNotServed, ProxyError
from proxy.dataplane.edge_options import EdgeOptions
from proxy.dataplane.health import HealthEndpoints
from proxy.dataplane.listener import EdgeServer
from proxy.dataplane.relay import error_response

if TYPE_CHECKING:
    from proxy.app.services import Services

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


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

    async def serve(request: web.BaseRequest) -> web.StreamResponse:
        try:
            refusal = method_refusal(request.method) or _target_refusal(request, listen_host)
            if refusal is not None:
                return error_response(refusal)
            if request.headers.get("Expect") is not None:
                await _expect(request)
            path = request.path
            if path == health_path:
                return await health.healthz(request)
            if path == ready_path:
                return await health.readyz(request)
            if not path.startswith("/"):
                # Asterisk form (OPTIONS *) and authority form (CONNECT host:port) name
                # no resource to proxy, and a CONNECT must never open a tunnel.
                raise PathNotServed(
                    f"{request.method} {path!r}: only a path can be proxied", code="404"
                )
        except Exception as exc:
            # The data plane's boundary, which answers (and records) everything past
            # this point.
            return error_response(boundary.error_for(exc, request))
        # Admission control (limits.*): only proxied requests queue or are shed.
        return await admission.run(request, dataplane.handle, dataplane.handle)

    return serve


def data_port_runner(services: Services) -> web.ServerRunner:
    """The data port's runner: ``data_port_handler`` behind the edge's limits.

    ``handler_cancellation``: a client that disconnects cancels its handler, which
    closes the upstream request instead of generating tokens nobody will read.
    ``auto_decompress=False``: a request body passes byte for byte, its
    Content-Encoding with it (aiohttp would inflate a gzip body and forward the plain
    bytes still labelled gzip, which the backend then fails to inflate).
    """
    server = EdgeServer(
        data_port_handler(services),
        options=EdgeOptions.data_port(services.settings),
        metrics=services.metrics,
        handler_cancellation=True,
        access_log=None,
        auto_decompress=False,
    )
    return web.ServerRunner(
        server, shutdown_timeout=services.settings.listen.shutdown_timeout_s
    )


def _target_refusal(request: web.BaseRequest, listen_host: str) -> ProxyError | None:
    """An absolute-form target not naming this proxy (edge_limits.target_refusal)."""
    target = request.raw_path
    if target.startswith("/"):
        return None  # origin form: nearly every request, decided without a lookup
    transport = request.transport
    local = transport.get_extra_info("sockname") if transport is not None else None
    # A wildcard listen host names no authority a client could have meant.
    hosts, port = ([] if listen_host in ("0.0.0.0", "::", "") else [listen_host]), None
    if isinstance(local, tuple | list) and len(local) >= 2:
        hosts.append(str(local[0]))
        port = int(local[1])
    return target_refusal(target, "http", hosts, port)


async def _expect(request: web.BaseRequest) -> None:
    """Answer ``Expect: 100-continue`` (RFC 9110 §10.1.1).

    The low-level server has no router to do it, and a client that sent it waits for
    the interim answer before sending its body: without one the request would stall
    until the client gives up.
    """
    expect = request.headers.get("Expect", "")
    if request.version != HttpVersion11:
        return  # HTTP/1.0 has no interim answers; the client sends its body anyway
    if expect.lower() != "100-continue":
        raise ExpectationFailed(f"unknown expectation {expect!r}", code="417")
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the interim answer is not part of the response
    await request.writer.drain()
