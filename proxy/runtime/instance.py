"""One running proxy: the services, the data port and the admin port, in one context.

``running_proxy`` opens the services (:func:`proxy.app.services.open_services`), starts
the data port, the admin port and the optional metrics port, and on exit stops them in
reverse: the metrics and admin listeners, then the data listener (which stops
accepting, then gives in-flight requests ``listen.shutdown_timeout_s`` to finish), then
the services. The server
process, the demo and the tests all run the proxy through it, so they cannot differ.
"""

from __future__ import annotations

from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from proxy.admin.app import build_admin_app
from proxy.admin.backend_urls import Resolver, system_resolve
from proxy.admin.metrics_routes import install_metrics_only
from proxy.admin.routes import installers
from proxy.app.dataport import data_port_server
from proxy.app.services import Services, open_services
from proxy.config.listen import is_loopback_address
from proxy.core.errors import ConfigError
from proxy.dataplane.edge_options import EdgeOptions
from proxy.dataplane.listener import EdgeAppRunner
from proxy.runtime.preflight import bind_error

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterable

    from proxy.config.settings import Settings


@dataclass(frozen=True, slots=True)
class RunningProxy:
    """A started proxy: its services and the addresses its listeners bound."""

    services: Services
    data_addresses: tuple[tuple[str, int], ...]
    admin_addresses: tuple[tuple[str, int], ...]  # empty when admin.enabled is false
    metrics_addresses: tuple[tuple[str, int], ...] = ()  # the metrics.port listener
    @property
    def url(self) -> str:
        host, port = self.data_addresses[0]
        return f"http://{_bracketed(host)}:{port}"

    @property
    def admin_url(self) -> str | None:
        if not self.admin_addresses:
            return None
        host, port = self.admin_addresses[0]
        return f"http://{_bracketed(host)}:{port}"


@asynccontextmanager
async def running_proxy(
    settings: Settings,
    *,
    reuse_port: bool = False,
    admin_resolve: Resolver = system_resolve,
    **service_options: Any,
) -> AsyncIterator[RunningProxy]:
    """Start the proxy ``settings`` describe; stop it, draining, when the block ends.

    ``service_options`` go to :func:`~proxy.app.services.open_services` (clock, rng,
    metrics registry, observers...). ``admin_resolve`` looks up the host names of
    backends added through the admin API.
    """
    async with open_services(settings, **service_options) as services, \
            AsyncExitStack() as stack:
        data = data_port_server(services)
        # Closed after the admin and metrics listeners (the stack unwinds in reverse):
        # stop accepting, then let requests in flight finish.
        stack.push_async_callback(data.shutdown, settings.listen.shutdown_timeout_s)
        try:
            await data.listen(settings.listen.host, settings.listen.port,
                              reuse_port=reuse_port, backlog=1024)
        except OSError as exc:
            raise bind_error("listen.port", settings.listen.host, settings.listen.port,
                             exc) from exc
        admin_addresses: tuple[tuple[str, int], ...] = ()
        if settings.admin.enabled:
            admin = admin_runner(services, admin_resolve)
            await admin.setup()
            stack.push_async_callback(admin.cleanup)
            await _listen(
                web.TCPSite(
                    admin, settings.admin.host, settings.admin.port, reuse_port=reuse_port
                ),
                "admin.port", settings.admin.host, settings.admin.port,
            )
            exposed = unguarded_addresses(settings.admin.token is not None, admin.addresses)
            if exposed:
                # admin.host passed the config check by name ("localhost") but
                # resolved elsewhere.
                raise ConfigError(
                    f"admin.host {settings.admin.host!r} bound {', '.join(exposed)}, not "
                    "loopback only: set admin.token (or PINPROXY_ADMIN__TOKEN) before "
                    "exposing the admin API"
                )
            admin_addresses = _addresses(admin.addresses)
        metrics_addresses: tuple[tuple[str, int], ...] = ()
        if settings.metrics.port is not None and settings.metrics.enabled:
            scrape = metrics_runner(services)
            await scrape.setup()
            stack.push_async_callback(scrape.cleanup)
            await web.TCPSite(
                scrape, settings.metrics.host, settings.metrics.port, reuse_port=reuse_port
            ).start()
            metrics_addresses = _addresses(scrape.addresses)
        yield RunningProxy(services, _addresses(data.addresses), admin_addresses,
                           metrics_addresses)


async def _listen(site: web.TCPSite, setting: str, host: str, port: int) -> None:
    """Start ``site`` (on ``host:port``); a port that cannot be bound is a one-line
    StartupError naming ``setting`` (busy, privileged, or not an address of this machine)."""
    try:
        await site.start()
    except OSError as exc:
        raise bind_error(setting, host, port, exc) from exc


def admin_runner(services: Services, resolve: Resolver = system_resolve) -> web.AppRunner:
    """The admin listener's runner: the admin app over ``services``, behind the edge."""
    return EdgeAppRunner(
        build_admin_app(services, installers(resolve)),
        options=EdgeOptions.admin_port(services.settings),
        metrics=services.metrics,
        access_log=None,
    )


def metrics_runner(services: Services) -> web.AppRunner:
    """The separate metrics listener's runner (``metrics.port``): GET /metrics, no token."""
    return EdgeAppRunner(
        build_admin_app(services, (install_metrics_only,), guarded=False),
        options=EdgeOptions.metrics_port(services.settings),
        metrics=services.metrics,
        access_log=None,
    )


def unguarded_addresses(has_token: bool, addresses: Iterable[Any]) -> list[str]:
    """The bound addresses an admin listener without a token must not have (non-loopback)."""
    if has_token:
        return []
    return [str(a[0]) for a in addresses if not is_loopback_address(str(a[0]))]


def _addresses(bound: Iterable[Any]) -> tuple[tuple[str, int], ...]:
    return tuple((str(a[0]), int(a[1])) for a in bound)


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host
