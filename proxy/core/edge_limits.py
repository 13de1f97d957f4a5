"""What the edge refuses before a request reaches the data plane (pure decisions).

The listener (listener.py) asks these for every connection and every request head:
connection caps (global and per client IP), the size of a request head, a declared
body over the limit, what to call a malformed request and the bytes of an answer
written outside any request; the data port's handler
(app/dataport.py) asks about methods never proxied and absolute-form targets. Nothing here
does I/O; the clock is passed in.
"""

from __future__ import annotations

import ipaddress
from http import HTTPStatus
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

from proxy.core.errors import (
    BadRequest,
    HeadersTooLarge,
    MethodNeverProxied,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
    TooManyConnections,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

# TRACE echoes the request back, Authorization and Cookie included (cross-site tracing);
# TRACK is IIS's alias. Neither is proxied.
REFUSED_METHODS: Final = frozenset({"TRACE", "TRACK"})
# What a 405 for them says the data port does take (RFC 9110 §15.5.6 wants Allow).
ALLOWED_METHODS: Final = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
_REQUEST_LINE_OVERHEAD: Final = len("  HTTP/1.1\r\n") + len("\r\n")
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


# --- connections ---------------------------------------------------------------------


class ConnectionAdmission:
    """Counts open connections, in all and per client IP, against their caps.

    ``admit`` answers None (counted) or why the connection is refused; every admitted
    connection is ``release``d exactly once. ``max_per_ip`` 0 means no per-IP cap.
    """

    __slots__ = ("_max_per_ip", "_max_total", "_per_ip", "total")

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self._max_total = max_total
        self._max_per_ip = max_per_ip
        self._per_ip: dict[str, int] = {}
        self.total = 0

    def admit(self, ip: str | None) -> str | None:
        if self.total >= self._max_total:
            return "max_connections"
        if ip is not None and self._max_per_ip:
            count = self._per_ip.get(ip, 0)
            if count >= self._max_per_ip:
                return "max_connections_per_ip"
            self._per_ip[ip] = count + 1
        self.total += 1
        return None

    def release(self, ip: str | None) -> None:
        self.total -= 1
        if ip is not None and self._max_per_ip:
            left = self._per_ip.get(ip, 0) - 1
            if left > 0:
                self._per_ip[ip] = left
            else:
                self._per_ip.pop(ip, None)

    def open_from(self, ip: str) -> int:
        """Connections counted for ``ip`` (0 when there is no per-IP cap)."""
        return self._per_ip.get(ip, 0)

    def __repr__(self) -> str:
        return f"ConnectionAdmission(total={self.total}/{self._max_total})"


def connection_refusal(reason: str, retry_after_s: int) -> ProxyError:
    """The 503 a connection over a cap gets before it is closed."""
    return TooManyConnections(retry_after_s, per_ip=reason == "max_connections_per_ip")


def head_timeout_error(timeout_s: float) -> ProxyError:
    return RequestTimeout(
        f"the request head did not arrive within {timeout_s:g}s", code="request_head_timeout"
    )


def head_too_large_error(limit: int) -> ProxyError:
    return HeadersTooLarge(
        f"the request head (request line and headers) is larger than {limit} bytes",
        code="request_head_too_large",
    )


def request_head_size(method: str, target: str, raw_headers: Sequence[tuple[bytes, bytes]]) -> int:
    """The bytes of a parsed request head: its request line, each ``name: value`` line
    and the blank line that ends it (the parser drops whitespace around values, which
    is not counted)."""
    size = len(method) + len(target) + _REQUEST_LINE_OVERHEAD
    for name, value in raw_headers:
        size += len(name) + len(value) + 4  # ": " and CRLF
    return size


def body_too_large_error(limit: int) -> ProxyError:
    return PayloadTooLarge(
        f"the request body is larger than {limit} bytes (listen.max_request_body_bytes)",
        code="request_body_too_large",
    )


def declared_body_too_large(content_length: str | None, limit: int) -> bool:
    """Whether a head's Content-Length (already validated digits) is over ``limit``
    (0: no limit)."""
    return bool(limit) and content_length is not None and int(content_length) > limit


# --- methods and targets ---------------------------------------------------------------


def method_refusal(method: str) -> ProxyError | None:
    """The 405 for a method that is never proxied (TRACE, TRACK), else None."""
    if method in REFUSED_METHODS:
        return MethodNeverProxied(method, ALLOWED_METHODS)
    return None


def unparsed_method_refusal(kinds: Sequence[str], message: str) -> ProxyError | None:
    """The 405 for a refused method the parser does not know (TRACK: llhttp parses
    only registered methods and calls the rest invalid), told by the request line its
    error quotes; else None."""
    if "BadHttpMethod" in kinds:
        for method in REFUSED_METHODS:
            if f"b'{method} " in message:
                return MethodNeverProxied(method, ALLOWED_METHODS)
    return None


def target_refusal(
    target: str, scheme: str, own_hosts: Iterable[str], own_port: int | None
) -> ProxyError | None:
    """The 400 for an absolute-form target (``GET http://host/path``) naming an
    authority other than the proxy's own, else None (origin form, or ours: then the
    request is served as its path).

    Ours: the listener's scheme, one of ``own_hosts`` (the address the client
    connected to, the configured listen host) and ``own_port``, with no user info.
    Never rewritten to another authority (a proxy that "fixed" such targets would
    serve requests meant for somewhere else as if they were its own).
    """
    if target.startswith("/") or "://" not in target:
        return None
    try:
        parts = urlsplit(target)
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower())
    except ValueError:
        port = None
        parts = None
    if (
        parts is not None
        and parts.scheme.lower() == scheme
        and port == own_port
        and "@" not in parts.netloc
        and any(_same_host(parts.hostname or "", host) for host in own_hosts)
    ):
        return None
    return BadRequest(
        "an absolute-form request target is served only for this proxy's own address;"
        " send the path alone (origin form)",
        code="invalid_request_target",
    )


def _same_host(a: str, b: str) -> bool:
    a, b = a.strip("[]").rstrip(".").lower(), b.strip("[]").rstrip(".").lower()
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return bool(a) and a == b


def raw_answer(error: ProxyError) -> bytes:
    """An answer written straight to the socket, outside any request: JSON, then close."""
    body = error.body()
    head = [f"HTTP/1.1 {error.status} {_reason(error.status)}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            "Connection: close"]
    head += [f"{name}: {value}" for name, value in error.headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


# --- warnings ------------------------------------------------------------------------


class WarningLimiter:
    """Lets one warning through per ``interval_s`` and counts the ones held back.

    Anyone can send malformed requests, so logging each would let anyone fill the log.
    """

    __slots__ = ("_clock", "_interval_s", "_next", "_suppressed")

    def __init__(self, interval_s: float, clock: Callable[[], float]) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._next = float("-inf")
        self._suppressed = 0

    def allow(self) -> int | None:
        """None: stay quiet. Else log now; the value is how many were held back since."""
        now = self._clock()
        if now < self._next:
            self._suppressed += 1
            return None
        self._next = now + self._interval_s
        held, self._suppressed = self._suppressed, 0
        return held

    def __repr__(self) -> str:
        return f"WarningLimiter(every {self._interval_s:g}s, held back {self._suppressed})"


# --- malformed requests ----------------------------------------------------------------

# What each reason tells the client: fixed text, never the bytes that were sent.
MALFORMED_DESCRIPTIONS: Final = {
    "method": "the request method is not a valid token (or the bytes are not HTTP at all)",
    "request_line": "the request line or its HTTP version is invalid",
    "target": "the request target contains characters a URL may not",
    "header": "a header line is invalid",
    "head_too_large": "a request line or header is too long, or there are too many headers",
    "content_length": "the Content-Length header is invalid",
    "body_framing": "the body's framing (Transfer-Encoding, chunk sizes) is invalid",
    "other": "the request is not valid HTTP/1.1",
}


def malformed_reason(kinds: Sequence[str], message: str, *, in_body: bool) -> str:
    """The reason (a bounded metrics label) for a parse error of aiohttp's parser.

    ``kinds``: the names of the exception's classes (its MRO); ``message``: its text,
    which for llhttp's generic ``BadHttpMessage`` is the only thing that tells them
    apart. ``in_body``: the error came while a request's body was being read.
    """
    if in_body:
        return "body_framing"
    text = message.lower()
    for kind, reason in (
        ("BadHttpMethod", "method"),
        ("InvalidURLError", "target"),
        ("BadStatusLine", "request_line"),
        ("LineTooLong", "head_too_large"),
        ("ContentLengthError", "content_length"),
        ("TransferEncodingError", "body_framing"),
        ("InvalidHeader", "header"),
    ):
        if kind in kinds:
            return reason
    if "too many headers" in text:
        return "head_too_large"
    if "transfer-encoding" in text or "chunk" in text:
        return "body_framing"  # incl. Transfer-Encoding beside Content-Length (smuggling)
    if "content-length" in text:
        return "content_length"
    if "header" in text:
        return "header"
    return "other"


def malformed_error(reason: str) -> ProxyError:
    """The JSON answer to a malformed request: 431 for an oversized head, else 400."""
    description = MALFORMED_DESCRIPTIONS.get(reason, MALFORMED_DESCRIPTIONS["other"])
    if reason == "head_too_large":
        return HeadersTooLarge(f"malformed request: {description}",
                               code="request_head_too_large")
    return BadRequest(f"malformed request: {description}", code="bad_http_request")
