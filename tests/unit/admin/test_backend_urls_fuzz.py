"""Backend URL validation, fuzzed against the parsers that later use the URL.

An accepted URL is only as safe as the host the clients then connect to: the upstream
client splits it with ``urlsplit`` (``framing.Target``) and the ``/version`` polls'
aiohttp client with yarl (``URL(backend.url + path)``, fleet/discovery.py). For any
text, ``check`` either refuses it or stores a URL whose host, for both parsers, is the
host that was resolved and checked.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from yarl import URL

from proxy.admin.backend_urls import BackendUrlPolicy, BackendUrlRefused
from proxy.config.settings import AdminConfig, BackendConfig, DiscoveryConfig
from proxy.upstream.framing import Target

NAMES = {"pop.internal": ["10.1.2.3"], "evil.example": ["169.254.169.254"]}
DENIED = [ipaddress.ip_network(n) for n in AdminConfig().denied_backend_networks]


async def resolve(host: str, port: int) -> list[str]:
    """Like getaddrinfo without DNS: numeric forms as inet_aton reads them, else a table."""
    if host in NAMES:
        return NAMES[host]
    try:
        return [socket.inet_ntoa(socket.inet_aton(host))]  # "2852039166", "0251.0376.0251.0376"
    except (OSError, ValueError) as exc:
        raise OSError(f"unknown host {host!r}") from exc


HOSTS = st.one_of(
    st.sampled_from([
        "pop.internal", "POP.internal.", "evil.example", "127.0.0.1", "169.254.169.254",
        "[::1]", "[::ffff:169.254.169.254]", "[fe80::1%25eth0]", "2852039166",
        "0251.0376.0251.0376", "0x7f.1", "metadata.google.internal", "pop.internal\\@evil",
        "%31%36%39.254.169.254", "pop.internal%2f@evil.example", "[v1.x]",
    ]),
    st.text(alphabet="abcdef.:[]%@\\/0123456789", max_size=20),
)
URLS = st.one_of(
    st.builds(
        lambda scheme, userinfo, host, port, path: f"{scheme}://{userinfo}{host}{port}{path}",
        st.sampled_from(["http", "https", "HTTP", "ftp", ""]),
        st.sampled_from(["", "", "user@", "a:b@"]),
        HOSTS,
        st.sampled_from(["", ":8000", ":0", ":99999", ":-1", ": 80"]),
        st.sampled_from(["", "/", "/v1", "/a?b", "/#f", "/%2e%2e/", "\\x"]),
    ),
    st.text(max_size=40),
)


@settings(max_examples=400, deadline=None)
@given(url=URLS)
# Found a bug: ":0" was accepted; the lean client then connected to port 80, aiohttp to 0.
@example(url="http://pop.internal:0")
@example(url="http://POP.internal./v1")
# Found a bug: a backslash in the path passed; yarl then refused the URL (a 500 on every
# streamed request to that backend, when aiohttp's client sent those).
@example(url="https://5/.]f\\x")
@example(url="http://pop.internal\\@evil.example/")
@example(url="http://2852039166/")  # decimal 169.254.169.254
@example(url="http://0251.0376.0251.0376/")  # octal 169.254.169.254
@example(url="http://%31%36%39.254.169.254/")
@example(url="http://pop.internal%2f@evil.example/")
def test_an_accepted_url_connects_only_where_it_was_checked(url: str) -> None:
    policy = BackendUrlPolicy(AdminConfig(), resolve=resolve)
    try:
        stored = asyncio.run(policy.check(url))
    except BackendUrlRefused:
        return
    target = Target(stored)
    scheme, host, port = target.origin
    assert scheme in ("http", "https")
    yarl = URL(stored + DiscoveryConfig().path)  # what aiohttp makes of the poll's URL
    assert yarl.scheme == scheme
    assert yarl.host is not None
    # Both clients connect to the same host and port ...
    assert yarl.host.lower().rstrip(".") == host.lower().rstrip("."), (url, stored)
    assert yarl.port == port
    # ... and it resolves only to addresses outside the denied networks.
    bare = host.lower().rstrip(".").strip("[]").split("%", 1)[0]
    try:
        addresses = [ipaddress.ip_address(bare)]
    except ValueError:
        addresses = [ipaddress.ip_address(a) for a in asyncio.run(resolve(bare, port))]
    for address in addresses:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        assert not any(address.version == n.version and address in n for n in DENIED), url
    assert "@" not in stored.split("//", 1)[1].split("/", 1)[0]


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://pop.internal:0", "port must be 1-65535"),
        ("http://pop.internal:99999", "invalid port"),
        ("http://pop.internal/a\\b", "backslash"),
    ],
)
def test_a_configured_backend_url_the_clients_cannot_use_is_refused_at_start(
    url: str, why: str
) -> None:
    # The same holes as above, in the config file: each was accepted, and then every
    # request to the backend failed (a ValueError in the client) or went to port 80.
    with pytest.raises(ValidationError, match=why):
        BackendConfig(id="b", region="r", url=url)
