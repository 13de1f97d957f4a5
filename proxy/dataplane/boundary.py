"""A port's one error boundary: whatever a handler raises becomes one JSON answer.

Each port (data, admin) has one ``ErrorBoundary``, and each catches ``Exception`` in
exactly one place with it (``DataPlane.handle`` and the data port's front door; the
admin app's guard middleware). A ``ProxyError`` is answered as itself; aiohttp's own
refusals (``web.HTTPException``) as the narrow class of their status; anything else is
a bug, answered as ``InternalError`` (a JSON 500 whose text says nothing of it) and
logged with its traceback at most once per ``interval_s``, so a bug every request
triggers cannot flood the log. The caller records the status it answered.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from proxy.core.edge_limits import WarningLimiter
from proxy.core.errors import InternalError, ProxyError, refusal_for_status

if TYPE_CHECKING:
    from collections.abc import Callable

logger = logging.getLogger(__name__)

# As often as the edge warns about malformed requests (listener.py).
LOG_EVERY_S = 10.0


def http_refusal(exc: web.HTTPException) -> ProxyError:
    """aiohttp's refusal (e.g. its 413) as the narrow error of its status."""
    return refusal_for_status(exc.status, exc.reason, code=str(exc.status))


class _Request(Protocol):
    """What a log line names of the request that failed (either port's request)."""

    @property
    def method(self) -> str: ...

    @property
    def path(self) -> str: ...


class ErrorBoundary:
    """Turns any exception a port's handler raised into the ``ProxyError`` to answer."""

    __slots__ = ("_internal", "_logs", "_observer_logs", "_port", "_translate")

    def __init__(
        self,
        port: str,
        *,
        where: str = "pinproxy",
        translate: Callable[[web.HTTPException], ProxyError] = http_refusal,
        interval_s: float = LOG_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``port``: named in the log line; ``where``: in the 500's message;
        ``translate``: the port's reading of aiohttp's refusals."""
        self._port = port
        self._internal = where
        self._translate = translate
        self._logs = WarningLimiter(interval_s, clock)
        # Apart: an observer failing on every request must not hide the first bug
        # that is answered 500.
        self._observer_logs = WarningLimiter(interval_s, clock)

    def error_for(self, exc: Exception, request: _Request | None = None) -> ProxyError:
        """The error to answer ``exc`` with (logging it when it is a bug)."""
        if isinstance(exc, ProxyError):
            return exc
        if isinstance(exc, web.HTTPException):
            return self._translate(exc)
        what = "" if request is None else f" {request.method} {request.path}"
        self._log(self._logs, exc, f"answering{what}", "answered 500")
        return InternalError(self._internal)

    def observer_failed(self, exc: Exception, observer: object) -> None:
        """A request observer raised: logged like a bug; the answer stands."""
        self._log(self._observer_logs, exc, f"in request observer {observer!r}",
                  "the answer stands")

    def _log(self, limiter: WarningLimiter, exc: Exception, doing: str, result: str) -> None:
        """Log an unexpected exception with its traceback, at most once per interval."""
        held = limiter.allow()
        if held is None:
            return
        more = f"; {held} more since the last such line" if held else ""
        logger.error("unexpected error %s on the %s port (%s%s)", doing, self._port, result,
                     more, exc_info=exc)

    def __repr__(self) -> str:
        return f"ErrorBoundary({self._port}, {self._logs!r})"

