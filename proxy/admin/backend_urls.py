"""Where a backend added through the admin API may point.

An admin token must not turn into a way to make the proxy send requests (with clients'
prompts) to, or fetch from, places it should not reach: cloud metadata services hand
out credentials to anything on the host that asks. So an added backend's URL must be
plain http(s) without credentials, and every address its host resolves to must be
inside the configured ``admin.backend_networks`` (None: anywhere) and outside
``admin.denied_backend_networks`` (by default link-local and known metadata
addresses); ``admin.denied_backend_hosts`` are refused by name before resolving.
IPv4-mapped IPv6 addresses are checked as the IPv4 address they carry.

Limitation: the check runs when the backend is added. A host name that later resolves
elsewhere (DNS rebinding) is not re-checked on each connection; operators who need
that should add backends by IP address or restrict ``backend_networks``.

Two refusals, both ``code: backend_url_refused`` naming ``url``: ``400`` when the URL
does not match ``URL_PATTERN`` (the admin OpenAPI document states the same pattern),
``403`` when it does but the policy refuses where it points (a denied host, an address
in a denied network or outside the allowed ones, a host that resolves to no address).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from typing import TYPE_CHECKING, Final, Protocol
from urllib.parse import urlsplit

from yarl import URL

from proxy.core.errors import BadRequest, Forbidden

if TYPE_CHECKING:
    from proxy.config.settings import AdminConfig

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Resolver(Protocol):
    """Every address a host name resolves to (an OSError when it resolves to none)."""

    async def __call__(self, host: str, port: int, /) -> list[str]: ...


# A base URL: http or https (any case), a host name, IPv4 or bracketed IPv6 address
# (zone id percent-encoded), an optional port 1-65535 and an optional path of RFC 3986
# path characters; no userinfo, query, fragment, whitespace or non-ASCII. The same
# text is a Python, a Rust (pydantic) and an ECMA-262 (JSON Schema) regular expression.
_PORT: Final = (
    r"(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
)
_HOST: Final = r"(?:[A-Za-z0-9_][A-Za-z0-9._-]*|\[[0-9A-Fa-f:.]+(?:%25[A-Za-z0-9._~-]+)?\])"
URL_PATTERN: Final = (
    rf"^[Hh][Tt][Tt][Pp][Ss]?://{_HOST}(?::{_PORT})?(?:/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*)?$"
)
_URL: Final = re.compile(URL_PATTERN)


class BackendUrlRefused(BadRequest):
    """An added backend's URL is malformed (400)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"url: {message}", code="backend_url_refused", param="url")


class BackendUrlForbidden(BackendUrlRefused, Forbidden):
    """An added backend's URL points somewhere the policy forbids (403)."""


async def system_resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (the event loop's getaddrinfo)."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return [str(info[4][0]) for info in infos]


class BackendUrlPolicy:
    """Checks an added backend's base URL against the admin settings."""

    def __init__(self, config: AdminConfig, resolve: Resolver = system_resolve) -> None:
        self._allowed: tuple[IPNetwork, ...] | None = (
            None
            if config.backend_networks is None
            else tuple(ipaddress.ip_network(n, strict=False) for n in config.backend_networks)
        )
        self._denied = tuple(
            ipaddress.ip_network(n, strict=False) for n in config.denied_backend_networks
        )
        self._denied_hosts = frozenset(config.denied_backend_hosts)
        self._timeout_s = config.resolve_timeout_s
        self._resolve = resolve

    async def check(self, url: str) -> str:
        """The URL as stored (no trailing slash); raises ``BackendUrlRefused`` naming why."""
        host, port = _parse(url)
        if host in self._denied_hosts:
            raise BackendUrlForbidden(
                f"host {host!r} is a denied host (admin.denied_backend_hosts)"
            )
        literal = _ip(host)
        if literal is not None:
            addresses = [literal]
        else:
            addresses = await self._lookup(host, port)
        for address in addresses:
            self._check_address(host, address)
        return url.rstrip("/")

    async def _lookup(self, host: str, port: int) -> list[IPAddress]:
        try:
            async with asyncio.timeout(self._timeout_s):
                found = await self._resolve(host, port)
        except (OSError, UnicodeError) as exc:  # socket.gaierror and TimeoutError included
            raise BackendUrlForbidden(f"host {host!r} cannot be resolved") from exc
        addresses = [a for a in (_ip(raw) for raw in found) if a is not None]
        if not addresses:
            raise BackendUrlForbidden(f"host {host!r} resolves to no IP address")
        return addresses

    def _check_address(self, host: str, address: IPAddress) -> None:
        shown = host if host == str(address) else f"{host!r} ({address})"
        for network in self._denied:
            if address.version == network.version and address in network:
                raise BackendUrlForbidden(
                    f"{shown} is in denied network {network} "
                    "(link-local or cloud metadata; see admin.denied_backend_networks)"
                )
        if self._allowed is not None and not any(
            address.version == n.version and address in n for n in self._allowed
        ):
            raise BackendUrlForbidden(
                f"{shown} is outside the allowed networks (admin.backend_networks)"
            )

    def __repr__(self) -> str:
        allowed = "any" if self._allowed is None else [str(n) for n in self._allowed]
        return f"BackendUrlPolicy(allowed={allowed}, denied={[str(n) for n in self._denied]})"


def _parse(url: str) -> tuple[str, int]:
    """The host (lowercase, no trailing dot) and port of a URL matching URL_PATTERN."""
    if not _URL.fullmatch(url):
        raise BackendUrlRefused(f"{_malformed(url)} (expected http(s)://host[:port][/path])")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        # The pattern matched, so this is a bracketed host that is no IPv6 address.
        raise BackendUrlForbidden(f"not an IP address: {exc}") from exc
    assert parts.hostname is not None  # the pattern requires a host
    default = 443 if parts.scheme == "https" else 80
    host, port = parts.hostname.lower().rstrip("."), port if port is not None else default
    try:
        seen = URL(url, encoded=True)  # how aiohttp's client will read it
    except ValueError as exc:
        raise BackendUrlRefused(f"not a valid URL: {exc}") from exc
    zoneless = host.split("%", 1)[0]  # an IPv6 zone id, percent-encoded or not
    if (seen.host or "").lower().rstrip(".").split("%", 1)[0] != zoneless or seen.port != port:
        raise BackendUrlRefused("is read differently by the HTTP clients")
    return host, port


def _malformed(url: str) -> str:
    """Why ``url`` does not match URL_PATTERN, in words."""
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        # urlsplit silently drops tabs and newlines; the stored URL would still hold them.
        return "must not contain whitespace or control characters"
    if not url.isascii():
        return "must be ASCII (percent-encode the path; a host name in punycode)"
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError as exc:
        return f"not a valid URL: {exc}"
    if parts.scheme not in ("http", "https"):
        return f"scheme must be http or https, not {parts.scheme or 'none'!r}"
    if "@" in parts.netloc:
        return "must not contain credentials (userinfo before '@')"
    if "\\" in url:
        # yarl (aiohttp's client) refuses a backslash that urlsplit takes as a path
        # character: every streamed request to such a backend would fail.
        return "must not contain a backslash"
    if parts.port == 0 or re.search(r":0[0-9]*(?:/|$)", parts.netloc + "/"):
        # urlsplit reads ":0" as port 0, the upstream client (framing.Target) as "no
        # port" (the default), aiohttp (the polls) as port 0: one URL, three destinations.
        return "port must be 1-65535, without leading zeros"
    if not parts.hostname:
        return "must name a host"
    if "?" in url or "#" in url:
        return "must not have a query or fragment"
    return "not a valid base URL"


def _ip(text: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:169.254.169.254 is 169.254.169.254
    return address
