"""The admin application: a second listener, never the data-plane port.

It reads and steers the services the composition root built (registry, store, ...),
which it is handed as one :class:`~proxy.app.services.Services`; it opens nothing of
its own. Every route needs
the bearer token (compared in constant time) unless its path is configured public.
Errors leave as the same OpenAI-shaped JSON as the data plane's; tokens never appear
in logs or error bodies.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy.admin.api import http_error, with_code
from proxy.app.services import Services
from proxy.core.errors import Unauthorized
from proxy.dataplane.boundary import ErrorBoundary
from proxy.dataplane.relay import error_response

logger = logging.getLogger(__name__)

SERVICES = web.AppKey("services", Services)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RouteInstaller = Callable[[web.Application], None]


def build_admin_app(
    services: Services,
    installers: tuple[RouteInstaller, ...] = (),
    *,
    guarded: bool = True,
) -> web.Application:
    """The admin app over ``services``; each installer adds its routes.

    ``guarded=False``: no token on any route (the separate metrics listener, which
    serves nothing but ``/metrics``).
    """
    config = services.settings.admin
    token = (
        config.token.get_secret_value().encode()
        if config.token is not None and guarded else None
    )
    public = frozenset(config.public_paths)
    boundary = ErrorBoundary("admin", where="the admin API", translate=http_error)

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        """The admin port's error boundary: every failure is a JSON answer."""
        try:
            if token is not None and request.path not in public:
                _check_token(request, token)
            return await handler(request)
        except Exception as exc:
            if isinstance(exc, web.HTTPException) and exc.status < 400:
                raise  # a redirect is an answer, not a failure
            return error_response(with_code(boundary.error_for(exc, request)))

    app = web.Application(middlewares=[guard], client_max_size=1024**2)
    app[SERVICES] = services
    if token is None and guarded:
        logger.warning("admin API has no token: it is bound to loopback only (%s)", config.host)
    for install in installers:
        install(app)
    return app


def _check_token(request: web.Request, token: bytes) -> None:
    """Accept exactly one ``Authorization: Bearer <token>`` naming ``token``; else 401.

    Every malformed credential is the same 401: no header, several, another scheme, an
    empty token, bytes that are not UTF-8 (aiohttp hands them over surrogate-escaped,
    so they are compared as the bytes that arrived, never decoded into a 500).
    """
    values = request.headers.getall("Authorization", ())
    scheme, _, presented = values[0].partition(" ") if len(values) == 1 else ("", "", "")
    credential = presented.strip().encode("utf-8", "surrogateescape")
    # compare_digest on the whole value: timing says nothing about how much matched.
    matches = hmac.compare_digest(credential, token)
    if scheme.lower() != "bearer" or not credential or not matches:
        raise Unauthorized(
            "missing or wrong admin token (send 'Authorization: Bearer <token>')",
            headers={"WWW-Authenticate": 'Bearer realm="pinproxy-admin"'},
        )
