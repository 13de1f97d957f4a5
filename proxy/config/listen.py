"""Settings of the two listeners: the data port (``listen``) and the admin API (``admin``).

Sections of ``proxy.config.Settings`` (which re-exports them): what a client may send
and for how long, whom to believe about the client's address, and who may steer the
fleet. Kept apart from the routing and transport settings.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Final, Self

from pydantic import Field, SecretStr, field_validator, model_validator

from proxy.config.observability import Section

# RFC 6750 §2.1 sends the token after "Bearer "; anything outside visible ASCII (or a
# space) could not arrive intact in a header, so such a token could never match.
_TOKEN_CHARS: Final = re.compile(r"[\x21-\x7e]+")
MIN_ADMIN_TOKEN_BYTES: Final = 32
_HEADER_VALUE: Final = re.compile(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?")


def _cidr_list(value: tuple[str, ...]) -> tuple[str, ...]:
    for cidr in value:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError as exc:
            raise ValueError(f"{cidr!r} is not an IP network in CIDR form") from exc
    return value


class ListenConfig(Section):
    host: str = "0.0.0.0"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    # Time an in-flight request gets to finish after SIGTERM before it is cut off.
    shutdown_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    # Peers (CIDRs) whose X-Forwarded-* headers are believed: an ingress or load
    # balancer in front. From anyone else those headers are replaced by what the socket
    # says (see forwarded.py); empty: nobody is believed.
    trusted_proxies: tuple[str, ...] = ()
    # Liveness and readiness on the data port. The defaults live under a prefix no
    # OpenAI-style API uses, so they cannot shadow a proxied path; change them if yours does.
    health_path: Annotated[str, Field(pattern=r"^/[^?#]*$")] = "/_pinproxy/healthz"
    ready_path: Annotated[str, Field(pattern=r"^/[^?#]*$")] = "/_pinproxy/readyz"
    # After SIGTERM, readiness answers 503 for this long while requests are still
    # served, so load balancers stop sending before the listener closes (a few
    # seconds in production; longer than the balancer's readiness probe interval).
    drain_grace_s: Annotated[float, Field(ge=0, le=300)] = 0.0
    # Slow clients (slowloris). A connection's first request head must arrive whole
    # within request_head_timeout_s of the connection opening, and every later head
    # within that long of its first byte (else 408, and the connection is closed); a
    # keep-alive connection idle between requests is closed after keepalive_timeout_s.
    # The default idle timeout outlasts the balancers commonly in front (AWS ALB 60 s,
    # Google Cloud 600 s), so they, not pinproxy, close idle connections: a request
    # they send as pinproxy closes would otherwise fail.
    request_head_timeout_s: Annotated[float, Field(gt=0, le=600)] = 10.0
    keepalive_timeout_s: Annotated[float, Field(gt=0, le=86_400)] = 620.0
    # Connections open at once, in all and per client IP (the socket's peer address;
    # 0: no per-IP cap, since behind an ingress every connection comes from it). A
    # connection over either cap is answered 503 proxy_overloaded and closed.
    max_connections: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000
    max_connections_per_ip: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    # Sizes. A request head (request line and headers) over max_request_head_bytes is
    # answered 431 before anything is forwarded (aiohttp's parser caps also apply: a
    # line over 8190 bytes, more than 128 headers). A body over max_request_body_bytes is
    # answered 413: up front when its Content-Length says so, else (chunked) as soon as
    # that much has arrived, the upstream request aborted. 0: no body limit. The default
    # fits chat requests with images; raise it for file uploads (/v1/files).
    max_request_head_bytes: Annotated[int, Field(ge=1024, le=16 * 1024 * 1024)] = 64 * 1024
    max_request_body_bytes: Annotated[int, Field(ge=0)] = 32 * 1024 * 1024
    # The Server header of every answer on both listeners (a backend's own is never
    # passed on); empty: no Server header, so nothing names the software or its version.
    server_header: Annotated[str, Field(max_length=200)] = ""

    # Removed: kept only so that a config still setting it is refused with a pointer
    # to its replacement rather than a bare "extra field".
    trust_forwarded_headers: Annotated[None, Field(exclude=True, repr=False)] = None

    @field_validator("trust_forwarded_headers", mode="before")
    @classmethod
    def _removed(cls, value: Any) -> None:
        raise ValueError(
            "was removed: list the addresses of the proxies in front, whose X-Forwarded-* "
            'headers are to be believed, in listen.trusted_proxies (CIDRs, e.g. ["10.0.0.0/8"])'
        )

    @field_validator("server_header")
    @classmethod
    def _header_value(cls, value: str) -> str:
        if value and not _HEADER_VALUE.fullmatch(value):
            raise ValueError("must be visible ASCII (spaces inside only)")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _trusted_cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _cidr_list(value)

    @model_validator(mode="after")
    def _distinct_health_paths(self) -> Self:
        if self.health_path == self.ready_path:
            raise ValueError("health_path and ready_path must differ")
        return self


class AdminConfig(Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 9901
    # Bearer token for every admin route; also read from PINPROXY_ADMIN__TOKEN. At least
    # 32 bytes of visible ASCII (e.g. `openssl rand -hex 32`). Without one the admin
    # listener only binds loopback addresses.
    token: SecretStr | None = None
    # Admin paths served without the token (e.g. "/metrics" for a scraper).
    public_paths: tuple[str, ...] = ()
    # Connections open at once on the admin listener (its head and idle timeouts are
    # listen's); over it a connection is answered 503 and closed.
    max_connections: Annotated[int, Field(ge=1, le=100_000)] = 256
    # Where a backend added through the admin API may point (an admin token must not
    # become a way to make the proxy fetch cloud credentials). Every address its host
    # resolves to must lie in one of ``backend_networks`` (CIDRs; None: anywhere) and
    # in none of ``denied_backend_networks``; ``denied_backend_hosts`` are refused by
    # name before resolving. The defaults refuse link-local and metadata endpoints.
    backend_networks: tuple[str, ...] | None = None
    denied_backend_networks: tuple[str, ...] = (
        "169.254.0.0/16",  # IPv4 link-local, incl. 169.254.169.254 (AWS, GCP, Azure, ...)
        "fe80::/10",  # IPv6 link-local
        "fd00:ec2::254/128",  # AWS metadata over IPv6
        "100.100.100.200/32",  # Alibaba Cloud metadata
        "168.63.129.16/32",  # Azure WireServer
    )
    denied_backend_hosts: tuple[str, ...] = ("metadata.google.internal", "metadata.goog")
    # How long resolving an added backend's host may take before the add is refused.
    resolve_timeout_s: Annotated[float, Field(gt=0, le=30)] = 2.0

    @field_validator("token")
    @classmethod
    def _strong_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        token = value.get_secret_value()
        if not token.strip():
            raise ValueError("must not be blank (leave it unset to keep the admin API on loopback)")
        if not _TOKEN_CHARS.fullmatch(token):
            raise ValueError("must be visible ASCII characters only, without spaces")
        if len(token.encode()) < MIN_ADMIN_TOKEN_BYTES:
            raise ValueError(
                f"must be at least {MIN_ADMIN_TOKEN_BYTES} bytes (e.g. `openssl rand -hex 32`)"
            )
        return value

    @field_validator("backend_networks", "denied_backend_networks")
    @classmethod
    def _cidrs(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if value is None else _cidr_list(value)

    @field_validator("denied_backend_hosts")
    @classmethod
    def _host_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(host.lower().rstrip(".") for host in value)

    @model_validator(mode="after")
    def _loopback_without_token(self) -> Self:
        if self.enabled and self.token is None and not is_loopback_host(self.host):
            raise ValueError(
                f"admin.host {self.host!r} is not a loopback address: set admin.token "
                "(or PINPROXY_ADMIN__TOKEN) before exposing the admin API"
            )
        return self


def is_loopback_host(host: str) -> bool:
    """Whether binding ``host`` keeps a listener on this machine, decided from addresses.

    An IP address is loopback when it is in 127.0.0.0/8 or is ::1 (an IPv4-mapped
    ``::ffff:127.x`` too); any other name is not, however it starts
    (``127.attacker.example`` is a name like any other). ``localhost`` is the one name
    taken as loopback (RFC 6761 §6.3 reserves it); the server checks the addresses
    it actually bound anyway (``bound_to_loopback``), so a resolver that maps it
    elsewhere stops the start instead of exposing the API.
    """
    if host.lower().rstrip(".") == "localhost":
        return True
    return is_loopback_address(host)


def is_loopback_address(address: str) -> bool:
    """Whether ``address`` (an IP address literal, brackets allowed) is loopback."""
    literal = address[1:-1] if address.startswith("[") and address.endswith("]") else address
    try:
        ip = ipaddress.ip_address(literal.partition("%")[0])  # a zone id names no address
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback
