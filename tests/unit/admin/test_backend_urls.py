"""The URL policy for backends added through the admin API (resolver faked: no DNS)."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.admin.backend_urls import URL_PATTERN, BackendUrlPolicy, BackendUrlRefused
from proxy.config.settings import AdminConfig

HOSTS = {
    "pop.internal": ["10.1.2.3"],
    "two-faced.example": ["10.1.2.3", "169.254.169.254"],  # one bad address is enough
    "mapped.example": ["::ffff:169.254.169.254"],
    "v6.example": ["2001:db8::5"],
    "empty.example": [],
}


async def fake_resolve(host: str, port: int) -> list[str]:
    if host not in HOSTS:
        raise OSError(f"unknown host {host}")
    return HOSTS[host]


def policy(**admin: object) -> BackendUrlPolicy:
    return BackendUrlPolicy(AdminConfig.model_validate(admin), resolve=fake_resolve)


@pytest.mark.parametrize(
    ("url", "stored"),
    [
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("https://pop.internal/base/", "https://pop.internal/base"),
        ("http://[2001:db8::1]:9000", "http://[2001:db8::1]:9000"),
        ("http://v6.example", "http://v6.example"),
        ("HTTP://POP.INTERNAL:80", "HTTP://POP.INTERNAL:80"),
    ],
)
async def test_allowed_by_default(url: str, stored: str) -> None:
    assert await policy().check(url) == stored


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://127.0.0.1/", "scheme must be http or https, not 'ftp'"),
        ("file:///etc/passwd", "scheme must be http or https"),
        ("127.0.0.1:8000", "scheme"),
        ("//127.0.0.1", "scheme must be http or https, not 'none'"),
        ("http://user:pw@127.0.0.1", "credentials"),
        ("http://user@127.0.0.1", "credentials"),
        ("http://:pw@127.0.0.1", "credentials"),
        ("http://", "must name a host"),
        ("http://127.0.0.1:99999", "not a valid URL"),
        ("http://127.0.0.1/?q=1", "query or fragment"),
        ("http://127.0.0.1/#x", "query or fragment"),
        ("http://127.0.0.1/?", "query or fragment"),
        ("http://127.0.0.1/\n", "whitespace"),
        ("http://127.0.0.1/caf\u00e9", "ASCII"),
    ],
)
async def test_a_malformed_url_is_a_400_with_the_reason(url: str, why: str) -> None:
    with pytest.raises(BackendUrlRefused) as info:
        await policy().check(url)
    assert why in info.value.message
    assert not re.fullmatch(URL_PATTERN, url)  # the documented pattern refuses it too
    assert (info.value.status, info.value.param) == (400, "url")
    assert info.value.code == "backend_url_refused"


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://169.254.169.254/latest/meta-data", "denied network 169.254.0.0/16"),
        ("http://169.254.1.1", "denied network 169.254.0.0/16"),
        ("http://[fe80::1]", "denied network fe80::/10"),
        ("http://[fe80::1%25eth0]", "denied network fe80::/10"),
        ("http://[fd00:ec2::254]", "denied network fd00:ec2::254/128"),
        ("http://[::ffff:169.254.169.254]", "denied network 169.254.0.0/16"),
        ("http://100.100.100.200", "denied network"),
        ("http://metadata.google.internal/computeMetadata/v1/", "denied host"),
        ("http://METADATA.GOOGLE.INTERNAL./", "denied host"),
        ("http://two-faced.example", "'two-faced.example' (169.254.169.254) is in denied"),
        ("http://mapped.example", "denied network 169.254.0.0/16"),
        ("http://nowhere.example", "cannot be resolved"),
        ("http://empty.example", "resolves to no IP address"),
        ("http://[::::]", "not an IP address"),
        ("http://[1.2.3.4]", "not an IP address"),
    ],
)
async def test_a_well_formed_url_the_policy_refuses_is_a_403_with_the_reason(
    url: str, why: str
) -> None:
    with pytest.raises(BackendUrlRefused) as info:
        await policy().check(url)
    assert why in info.value.message
    assert re.fullmatch(URL_PATTERN, url)  # well-formed by the documented pattern
    assert (info.value.status, info.value.param) == (403, "url")
    assert info.value.code == "backend_url_refused"


@settings(max_examples=300, deadline=None, derandomize=True)
@given(url=st.one_of(
    st.from_regex(URL_PATTERN, fullmatch=True),
    st.text(alphabet="hHtTpPsS:/[]%@?#.0123456789abcdef-_ \n\u00e9", max_size=40),
))
@example(url="http://a.")
@example(url="http://[::1%25]")
async def test_the_policy_refuses_as_malformed_exactly_what_the_pattern_refuses(url: str) -> None:
    """The pattern in the OpenAPI document and the policy's 400 are the same rule."""
    well_formed = re.fullmatch(URL_PATTERN, url) is not None
    refused: BackendUrlRefused | None = None
    try:
        await policy(denied_backend_networks=[], denied_backend_hosts=[]).check(url)
    except BackendUrlRefused as exc:
        refused = exc
    malformed = refused is not None and refused.status == 400
    assert malformed == (not well_formed), (url, refused)


async def test_allowlist_restricts_to_its_networks() -> None:
    strict = policy(backend_networks=["10.0.0.0/8"])
    assert await strict.check("http://pop.internal") == "http://pop.internal"
    assert await strict.check("http://10.9.9.9:80") == "http://10.9.9.9:80"
    for url in ("http://127.0.0.1", "http://v6.example", "http://[::1]"):
        with pytest.raises(BackendUrlRefused, match="outside the allowed networks"):
            await strict.check(url)


async def test_denylist_applies_inside_the_allowlist_and_can_be_changed() -> None:
    wide = policy(backend_networks=["0.0.0.0/0"])
    with pytest.raises(BackendUrlRefused, match="denied network"):
        await wide.check("http://169.254.169.254")
    # An operator who really proxies to a link-local POP can say so explicitly.
    relaxed = policy(denied_backend_networks=[], denied_backend_hosts=[])
    assert await relaxed.check("http://169.254.10.10") == "http://169.254.10.10"
    custom = policy(denied_backend_networks=["10.0.0.0/8"])
    with pytest.raises(BackendUrlRefused, match=re.escape("denied network 10.0.0.0/8")):
        await custom.check("http://pop.internal")


async def test_slow_resolution_is_refused() -> None:
    async def slow(host: str, port: int) -> list[str]:
        import asyncio

        await asyncio.sleep(5)
        return ["10.0.0.1"]

    hasty = BackendUrlPolicy(AdminConfig(resolve_timeout_s=0.05), resolve=slow)
    with pytest.raises(BackendUrlRefused, match="cannot be resolved"):
        await hasty.check("http://pop.internal")


def test_bad_networks_in_config_are_refused_at_start() -> None:
    with pytest.raises(ValueError, match="not an IP network"):
        AdminConfig(backend_networks=("10.0.0.0/33",))
    with pytest.raises(ValueError, match="not an IP network"):
        AdminConfig(denied_backend_networks=("nope",))
    assert AdminConfig(denied_backend_hosts=("Meta.Example.",)).denied_backend_hosts == (
        "meta.example",
    )
