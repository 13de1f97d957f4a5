"""Who the client is: the X-Forwarded-For walk, against an oracle and by its promises."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.core.forwarded import Forwarding, TrustedProxies, forwarding, parse_address, walk

TRUSTED_POOL = ["10.0.0.0/8", "192.168.1.0/24", "fd00::/8", "203.0.113.5/32"]
ADDRESSES = [
    "10.0.0.1", "10.1.2.3", "192.168.1.7", "192.168.2.7", "203.0.113.5", "203.0.113.6",
    "6.6.6.6", "7.7.7.7", "198.51.100.1", "fd00::1", "2001:db8::1", "::ffff:10.0.0.9",
]
HOPS = st.one_of(
    st.sampled_from(ADDRESSES),
    st.sampled_from(["unknown", "", "not-an-ip", "1.2.3", "[2001:db8::2]:443", "6.6.6.6:80"]),
)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = parse_address(text)
    assert ip is not None
    return ip


def oracle(peer: str, hops: list[str], trusted: list[str]) -> list[str]:
    """The believed chain, by index: step left from the peer while the current hop is
    a trusted proxy and the one it reports is an address."""
    networks = [ipaddress.ip_network(c) for c in trusted]

    def trusts(text: str) -> bool:
        ip = parse_address(text)
        return ip is not None and any(ip in n for n in networks)

    full = [h.strip() for value in hops for h in value.split(",") if h.strip()] + [peer]
    i = len(full) - 1
    while i > 0 and trusts(full[i]) and parse_address(full[i - 1]) is not None:
        i -= 1
    return [str(_ip(h)) for h in full[i:]]


@settings(max_examples=400, deadline=None)
@given(
    peer=st.sampled_from(ADDRESSES),
    hops=st.lists(st.one_of(HOPS, st.lists(HOPS, max_size=3).map(", ".join)), max_size=6),
    trusted=st.lists(st.sampled_from(TRUSTED_POOL), unique=True, max_size=4),
    forged=st.lists(st.sampled_from(ADDRESSES), max_size=3),
)
# The case: nothing trusted, the client's own chain is not appended to.
@example(peer="127.0.0.1", hops=["6.6.6.6, 7.7.7.7"], trusted=[], forged=[])
# An ingress in 10/8 reporting a client, who forged a chain before it.
@example(peer="10.0.0.1", hops=["6.6.6.6", "198.51.100.1, 10.1.2.3"], trusted=["10.0.0.0/8"],
         forged=["7.7.7.7"])
# A trusted hop reporting garbage: the walk stops at that hop.
@example(peer="10.0.0.1", hops=["6.6.6.6, unknown"], trusted=["10.0.0.0/8"], forged=[])
def test_the_client_is_the_rightmost_untrusted_hop_and_nothing_left_of_it_counts(
    peer: str, hops: list[str], trusted: list[str], forged: list[str]
) -> None:
    trust = TrustedProxies(trusted)
    chain = [str(ip) for ip in walk(_ip(peer), hops, trust)]
    assert chain == oracle(peer, hops, trusted)
    assert chain[-1] == str(_ip(peer))
    # Every hop after the client vouched for the one before it.
    assert all(trust.trusts(_ip(hop)) for hop in chain[1:])
    if not trust:
        assert chain == [str(_ip(peer))]
    # Whatever a client writes to the left of itself changes nothing.
    if not trust.trusts(_ip(chain[0])):
        assert walk(_ip(peer), [", ".join(forged), *hops] if forged else hops, trust) == [
            _ip(hop) for hop in chain
        ]


@pytest.mark.parametrize(("text", "expected"), [
    ("192.0.2.1", "192.0.2.1"), (" 192.0.2.1 ", "192.0.2.1"), ("192.0.2.1:8080", "192.0.2.1"),
    ("[2001:db8::1]:443", "2001:db8::1"), ("[2001:db8::1]", "2001:db8::1"),
    ("2001:db8::1", "2001:db8::1"), ("::ffff:10.0.0.9", "10.0.0.9"), ("fe80::1%eth0", "fe80::1"),
    ("unknown", None), ("", None), ("1.2.3", None), ("evil.example", None), ("_hidden", None),
])
def test_hops_parse_as_addresses_with_ports_and_brackets(text: str, expected: str | None) -> None:
    ip = parse_address(text)
    assert (None if ip is None else str(ip)) == expected


def test_with_nobody_trusted_the_peer_is_the_client_and_nothing_else_is_read() -> None:
    forged = [("x-forwarded-for", "6.6.6.6"), ("x-forwarded-proto", "https"),
              ("x-forwarded-host", "evil.example")]
    assert forwarding("127.0.0.1", "http", TrustedProxies([]), forged) == Forwarding(
        "127.0.0.1", "127.0.0.1", "http", None)
    # A peer outside the trusted networks is not believed either.
    assert forwarding("192.0.2.9", "http", TrustedProxies(["10.0.0.0/8"]), forged) == Forwarding(
        "192.0.2.9", "192.0.2.9", "http", None)
    assert forwarding(None, "http", TrustedProxies([]), forged) == Forwarding(
        None, None, "http", None)


def test_a_trusted_peer_is_believed_about_the_client_its_scheme_and_host() -> None:
    trust = TrustedProxies(["10.0.0.0/8"])
    headers = [("x-forwarded-for", "6.6.6.6, 198.51.100.1"), ("x-forwarded-proto", "https"),
               ("x-forwarded-host", "api.example:443")]
    assert forwarding("10.0.0.1", "http", trust, headers) == Forwarding(
        "198.51.100.1", "198.51.100.1, 10.0.0.1", "https", "api.example:443")
    odd = [("x-forwarded-proto", "gopher"), ("x-forwarded-host", "a b\r\nX-Evil: 1")]
    assert forwarding("10.0.0.1", "http", trust, odd) == Forwarding(
        "10.0.0.1", "10.0.0.1", "http", None)
