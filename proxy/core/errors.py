"""The one error hierarchy: every failure a client can see is a ``ProxyError``.

Library exceptions (aiohttp, redis, pydantic) are translated into these at the one
boundary that talks to that library, with ``raise ... from exc``. Each port has
one error boundary (proxy/dataplane/boundary.py) that turns any ``ProxyError`` into an
OpenAI-shaped JSON body and anything else into ``InternalError``'s JSON 500, with no
traceback. An error's HTTP status is its class's: a different status is a different
(narrow) class, never an argument.
"""

from __future__ import annotations

from typing import Any

import orjson


class ProxyError(Exception):
    """Base of every error pinproxy reports; carries the HTTP status and OpenAI error type."""

    status: int = 500
    error_type: str = "internal_error"
    # The body's ``code`` when the raiser names none: every error a client sees has a
    # stable, non-null code to branch on (tests/unit/core/test_error_codes.py walks them all).
    default_code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        if code is None:
            code = self.default_code
        self.message = message
        self.code: str = code
        self.param = param
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> bytes:
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.error_type,
            "param": self.param,
            "code": self.code,
        }
        error.update(self.extra)
        return orjson.dumps({"error": error})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, message={self.message!r})"


class InternalError(ProxyError):
    """A bug in pinproxy: the boundary's answer to any exception that is no ProxyError.

    Its message is fixed, so nothing of the failure (a traceback, a secret) reaches the
    client; the boundary logs the traceback instead.
    """

    def __init__(self, where: str = "pinproxy") -> None:
        super().__init__(f"internal error in {where}", code="internal_error")


class HandlerTimeout(ProxyError):
    """The request was not finished within the listener's handler deadline."""

    status = 504
    default_code = "timeout"


class BadRequest(ProxyError):
    status = 400
    error_type = "invalid_request_error"
    default_code = "invalid_request"


# The 4xx refusals below are client errors of the same OpenAI type as BadRequest, each
# with its own status: code that catches BadRequest catches them all.


class Forbidden(BadRequest):
    status = 403
    default_code = "forbidden"


class PathNotServed(BadRequest):
    """No route serves this request target (aiohttp's 404, a data-port asterisk form)."""

    status = 404
    default_code = "not_found"


class MethodNotAllowed(BadRequest):
    status = 405
    default_code = "method_not_allowed"


class MethodNeverProxied(MethodNotAllowed):
    """A method pinproxy never proxies (TRACE, TRACK): 405 with ``Allow``."""

    def __init__(self, method: str, allowed: str) -> None:
        super().__init__(
            f"method {method} is not allowed through this proxy",
            code="method_not_allowed",
            headers={"Allow": allowed},
        )


class RequestTimeout(BadRequest):
    status = 408
    default_code = "request_timeout"


class PayloadTooLarge(BadRequest):
    status = 413
    default_code = "request_too_large"


class ExpectationFailed(BadRequest):
    status = 417
    default_code = "expectation_failed"


class HeadersTooLarge(BadRequest):
    status = 431
    default_code = "request_head_too_large"


_REFUSALS: dict[int, type[BadRequest]] = {
    cls.status: cls
    for cls in (BadRequest, Forbidden, PathNotServed, MethodNotAllowed, RequestTimeout,
                PayloadTooLarge, ExpectationFailed, HeadersTooLarge)
}


def refusal_for_status(
    status: int, message: str, *, code: str | None = None,
    headers: dict[str, str] | None = None,
) -> ProxyError:
    """The narrow error class for an HTTP status a library refused a request with.

    For translating a library's refusal (aiohttp's 404, 405, 413...) only; a 4xx
    without a class of its own is a 400, and any 5xx an internal error, keeping ``code``.
    """
    if status >= 500:
        return ProxyError(message, code=code, headers=headers)
    return _REFUSALS.get(status, BadRequest)(message, code=code, headers=headers)


class Unauthorized(ProxyError):
    status = 401
    error_type = "authentication_error"
    default_code = "unauthorized"


class NotFound(ProxyError):
    status = 404
    error_type = "not_found_error"
    default_code = "not_found"


class Conflict(ProxyError):
    status = 409
    error_type = "conflict_error"
    default_code = "conflict"


class RetryLater(ProxyError):
    """A 503 that tells the client when to try again (``Retry-After``)."""

    status = 503
    default_code = "retry_later"

    def __init__(
        self, message: str, retry_after_s: int, *, extra: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)}, extra=extra)


class VersionUnavailable(RetryLater):
    """The session's pinned version has no healthy backend (after waiting ``pin_wait_ms``)."""

    error_type = "version_unavailable"
    default_code = "version_unavailable"

    def __init__(self, version_key: str, retry_after_s: int, message: str | None = None) -> None:
        super().__init__(
            message
            or f"no healthy backend currently serves pinned version {version_key!r}; retry later",
            retry_after_s,
            extra={"pinned_version": version_key},
        )
        self.version_key = version_key


class NoBackends(RetryLater):
    error_type = "no_backends"
    default_code = "no_backends"

    def __init__(self, retry_after_s: int) -> None:
        super().__init__("no healthy backend with a known version is available", retry_after_s)


class StoreUnavailable(ProxyError):
    """The pin store could not be reached; the proxy refuses rather than guess a pin.

    Answered as a 503 with ``Retry-After`` (the data plane sets the configured value)
    and a ``code`` (``pin_store_unavailable`` unless the raiser names another).
    ``timed_out``: no answer within the operation timeout (rather than a refusal or a
    broken connection), which a saturated proxy can also cause (see Overloaded);
    ``store_answering``: other calls succeeded meanwhile, so the store itself works.
    """

    status = 503
    error_type = "pin_store_unavailable"
    timed_out = False
    store_answering = False
    default_code = "pin_store_unavailable"

    def __init__(self, message: str, *, code: str = "pin_store_unavailable") -> None:
        super().__init__(message, code=code, headers={"Retry-After": "1"})


class PinLost(RetryLater):
    """A continuing conversation found no pin, and ``sessions.on_lost_pin`` is refuse.

    Its pin may still come back: after the store lost data, the replicas that hold it
    write it back within about a second.
    """

    error_type = "pin_lost"
    default_code = "pin_lost"

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(
            "this conversation's version pin was lost by the pin store and is being "
            "restored; retry later (answering it on another version could change its "
            "behaviour mid-conversation)",
            retry_after_s,
        )
        self.code = "pin_lost"


class Overloaded(RetryLater):
    """This proxy is too busy to serve the request in time; another replica may not be."""

    error_type = "proxy_overloaded"
    default_code = "proxy_overloaded"

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(
            "pinproxy is overloaded and could not serve the request in time; retry",
            retry_after_s,
        )


class Shedding(Overloaded):
    """Admission control shed the request before the handler ran (proxy/core/admission.py):
    nothing was sent upstream, nothing pinned. ``reason`` (queue_full, queue_timeout,
    loop_lag) is in the body, beside ``code: proxy_overloaded``."""

    def __init__(self, retry_after_s: int, reason: str) -> None:
        RetryLater.__init__(
            self, f"pinproxy is at capacity ({reason}); retry later", retry_after_s,
            extra={"reason": reason},
        )
        self.reason = reason


class TooManyConnections(RetryLater):
    """A connection over ``listen.max_connections`` (or the per-IP cap): answered, closed."""

    error_type = "proxy_overloaded"
    default_code = "too_many_connections"

    def __init__(self, retry_after_s: int, *, per_ip: bool) -> None:
        whose = " from your address" if per_ip else ""
        super().__init__(f"too many connections to pinproxy{whose}; retry later", retry_after_s)
        self.code = "too_many_connections"


class UpstreamError(ProxyError):
    """The chosen backend failed before sending a response head."""

    status = 502
    error_type = "upstream_error"
    default_code = "upstream_error"


class UpstreamHeadTooLarge(UpstreamError):
    """The backend's response head was over ``upstream.max_response_head_bytes`` or had
    more than ``upstream.max_response_headers`` headers: never relayed, the connection
    closed. A 502 with ``code: upstream_head_too_large``."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="upstream_head_too_large")


class UpstreamTimeout(UpstreamError):
    status = 504
    error_type = "upstream_timeout"
    default_code = "upstream_timeout"


class UpstreamConnectError(UpstreamError):
    """No connection to the backend: nothing of the request was written.

    The backend cannot have acted on the request, so it may go to another backend of
    the same version whatever its method (invariant 5); the backend is suspect.
    """

    default_code = "upstream_connect_failed"


class UpstreamDropped(UpstreamError):
    """The request was written, then the connection ended before a response head.

    The backend may have acted on it (a completion is billed), so it is replayed only
    when its method is idempotent or it carries an ``Idempotency-Key`` (nginx's and
    Go's rule); ``reused`` says it went out on a pooled keep-alive connection. Told to
    the client as Envoy does a reset before headers: 503 with ``Retry-After`` and
    ``code: upstream_dropped``, since it is the client that knows whether trying
    again is safe.
    """

    status = 503
    default_code = "upstream_dropped"

    def __init__(
        self, message: str, *, reused: bool = False, retry_after_s: int | None = None
    ) -> None:
        super().__init__(
            message,
            code="upstream_dropped",
            headers=None if retry_after_s is None else {"Retry-After": str(retry_after_s)},
        )
        self.reused = reused


class UpstreamBodyError(UpstreamError):
    """The backend failed after its response head: the answer is incomplete."""

    default_code = "upstream_body_broken"


class ConfigError(Exception):
    """Invalid configuration; raised at start (or by a refused live reload), never at
    request time. ``fields``: the dotted names of the settings at fault, when known."""

    fields: tuple[str, ...] = ()


class StartupError(ConfigError):
    """Valid settings this process cannot start with: a port in use, a missing extra.

    ``pinproxy serve`` reports it (like any ``ConfigError``) as one line and exit code 2.
    """
