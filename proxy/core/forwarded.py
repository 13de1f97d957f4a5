"""Who the client is, and what the forwarding headers sent upstream say about it (pure).

A client can write anything into ``X-Forwarded-For``; only a proxy in front that we
trust (``listen.trusted_proxies``) can vouch for what came before it. So the chain is
read right to left, from the socket's peer: each hop is believed only while the hop
after it is a trusted proxy, and the client is the rightmost hop that is not one
(nginx's ``real_ip_recursive``, Envoy's ``xff_num_trusted_hops`` by address). What
the client wrote to the left of that is dropped, not passed on. With nobody trusted,
every forwarding header a client sent is replaced by what the socket says.

Upstream then gets exactly: ``X-Forwarded-For`` = the believed chain (client first,
the peer last), ``X-Real-IP`` = the client, ``X-Forwarded-Proto`` = what a trusted
peer said (``http``/``https``) or else our listener's scheme, and ``X-Forwarded-Host``
only from a trusted peer. ``Forwarded`` (RFC 7239) is never passed on: it would be a
second, unchecked account of the same chain.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import TYPE_CHECKING, Final, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# "[v6]:port", "[v6]", "v4:port" (Azure and some CDNs append the client's port).
_BRACKETED: Final = re.compile(r"\[([^\]]+)\](?::\d{1,5})?")
_V4_PORT: Final = re.compile(r"(\d{1,3}(?:\.\d{1,3}){3}):\d{1,5}")
_HOST: Final = re.compile(r"[A-Za-z0-9.-]{1,253}(?::\d{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](?::\d{1,5})?")


@functools.lru_cache(maxsize=4096)  # the same peers and hops come again and again
def parse_address(text: str) -> Address | None:
    """An IP address from a forwarding hop or socket peer (a port or brackets allowed);
    an IPv4-mapped IPv6 address is its IPv4 address. None: not an address."""
    text = text.strip()
    try:
        ip = ipaddress.ip_address(text.partition("%")[0])  # a zone id names no address
    except ValueError:
        match = _BRACKETED.fullmatch(text) or _V4_PORT.fullmatch(text)
        if match is None:
            return None
        try:
            ip = ipaddress.ip_address(match.group(1).partition("%")[0])
        except ValueError:
            return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class TrustedProxies:
    """The networks whose forwarding headers are believed (``listen.trusted_proxies``)."""

    __slots__ = ("_networks", "trusts")

    def __init__(self, cidrs: Iterable[str]) -> None:
        self._networks = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)
        # Per instance (its networks decide), bounded: the same hops come again and again.
        self.trusts = functools.lru_cache(maxsize=4096)(self._trusts)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def _trusts(self, ip: Address) -> bool:
        """Whether ``ip`` lies in one of the trusted networks."""
        return any(ip in network for network in self._networks)

    def __repr__(self) -> str:
        return f"TrustedProxies({', '.join(map(str, self._networks)) or 'none'})"


def walk(peer: Address, forwarded_for: Sequence[str], trusted: TrustedProxies) -> list[Address]:
    """The believed chain, client first and ``peer`` last.

    ``forwarded_for``: the X-Forwarded-For values as received, in order. A hop is
    taken only while the one to its right is trusted; a hop that is not an address
    ends the walk at the trusted hop that reported it.
    """
    chain = [peer]
    if not trusted.trusts(peer):
        return chain
    hops = [hop for value in forwarded_for for hop in value.split(",") if hop.strip()]
    for text in reversed(hops):
        ip = parse_address(text)
        if ip is None:
            break
        chain.append(ip)
        if not trusted.trusts(ip):
            break
    chain.reverse()
    return chain


class Forwarding(NamedTuple):
    """What the forwarding headers sent upstream say (see the module docstring).

    A tuple: made once per request, and a frozen dataclass costs several times as
    much to build."""

    client: str | None  # the resolved client address; None: the socket had no IP peer
    chain: str | None  # X-Forwarded-For
    proto: str  # X-Forwarded-Proto
    host: str | None  # X-Forwarded-Host, from a trusted peer only


def forwarding(
    peer: str | None,
    scheme: str,
    trusted: TrustedProxies,
    headers: Sequence[tuple[str, str]],
) -> Forwarding:
    """Resolve the client of a request from its socket ``peer`` and ``headers``.

    ``headers``: (lowercased name, value) of the forwarding headers as received, minus
    any named in ``Connection`` (a hop-by-hop header is not the next hop's to read);
    ``scheme``: our listener's.
    """
    if not peer:
        return Forwarding(None, None, scheme, None)  # not an IP socket (a Unix socket)
    if not trusted:
        # The common case, on every request: the socket's peer, as the socket says.
        return Forwarding(peer, peer, scheme, None)
    ip = parse_address(peer)
    if ip is None:
        return Forwarding(None, None, scheme, None)
    if not trusted.trusts(ip):
        client = str(ip)
        return Forwarding(client, client, scheme, None)
    chain = walk(ip, [v for name, v in headers if name == "x-forwarded-for"], trusted)
    protos = [v.rsplit(",", 1)[-1].strip().lower() for n, v in headers if n == "x-forwarded-proto"]
    proto = protos[-1] if protos and protos[-1] in ("http", "https") else scheme
    hosts = [v.strip() for n, v in headers if n == "x-forwarded-host"]
    host = hosts[-1] if hosts and _HOST.fullmatch(hosts[-1]) else None
    return Forwarding(str(chain[0]), ", ".join(map(str, chain)), proto, host)
