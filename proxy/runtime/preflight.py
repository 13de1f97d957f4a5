"""Checks before serving: what would fail later with a traceback fails now with a line.

``require_extras`` refuses settings that need a package that is not installed;
``bind_error`` turns a listening socket's ``OSError`` into the setting to change;
``startup_warnings`` names settings that are valid but probably not meant.
"""

from __future__ import annotations

import errno
import importlib.util
from typing import TYPE_CHECKING, Final

from proxy.core.errors import StartupError

if TYPE_CHECKING:
    from proxy.config.settings import Settings

# Health paths under this prefix cannot shadow an API path (no API uses it).
RESERVED_PREFIX: Final = "/_pinproxy/"
_OTLP_EXPORTER: Final = "opentelemetry.exporter.otlp.proto.http.trace_exporter"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def require_extras(settings: Settings) -> None:
    """Raise ``StartupError`` when a setting needs an optional extra that is missing."""
    if settings.tracing.otlp_endpoint is not None and not _installed(_OTLP_EXPORTER):
        raise StartupError(
            "tracing.otlp_endpoint is set but OpenTelemetry is not installed: "
            "pip install 'pinproxy[otel]' (or unset tracing.otlp_endpoint)"
        )


def bind_error(setting: str, host: str, port: int, exc: OSError) -> StartupError:
    """The one line for a listener that could not bind ``host:port`` (``setting``)."""
    reason = {
        errno.EADDRINUSE: "the address is already in use (another process listens there)",
        errno.EACCES: "permission denied (ports below 1024 need privileges)",
        errno.EADDRNOTAVAIL: "the address is not one of this machine's",
    }.get(exc.errno or 0, exc.strerror or str(exc))
    return StartupError(f"{setting}: cannot listen on {host}:{port}: {reason}")


def startup_warnings(settings: Settings) -> list[str]:
    """Valid settings that are probably a mistake, one sentence each."""
    warnings = []
    if not settings.backends:
        warnings.append(
            "no backends are configured: every request is answered 503 until backends are "
            "added through the admin API (POST /admin/backends)"
        )
    for name in ("health_path", "ready_path"):
        path = getattr(settings.listen, name)
        if not path.startswith(RESERVED_PREFIX):
            warnings.append(
                f"listen.{name} {path!r} is outside {RESERVED_PREFIX}: pinproxy answers it "
                "itself, so a backend path of that name is never reached"
            )
    return warnings


def probe_bind(setting: str, host: str, port: int) -> None:
    """Bind and release ``host:port`` as the workers will (SO_REUSEPORT), or raise.

    With several workers the sockets are bound in child processes; a port taken by
    another program would otherwise show as workers dying and being restarted.
    """
    import socket

    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise StartupError(f"{setting}: cannot resolve {host!r}: {exc.strerror}") from exc
    for family, kind, proto, _name, address in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise bind_error(setting, host, port, exc) from exc
