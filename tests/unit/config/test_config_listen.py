"""The listeners' settings: admin tokens, loopback decided from addresses, edge limits."""

from __future__ import annotations

import os
from typing import Any

import pytest

from proxy.config.listen import is_loopback_address, is_loopback_host
from proxy.config.settings import settings_from_mapping
from proxy.core.errors import ConfigError

GOOD_TOKEN = "0123456789abcdef0123456789abcdef"  # exactly 32 bytes


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("PINPROXY_"):
            monkeypatch.delenv(name)


def refused(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        settings_from_mapping(data)
    return str(info.value).splitlines()[1:]


@pytest.mark.parametrize("token", ["", " ", "\t \n", " " * 40])
@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1"])
def test_a_blank_admin_token_is_refused_at_start(token: str, host: str) -> None:
    (line,) = refused({"admin": {"host": host, "token": token}})
    assert line.startswith("  admin.token: Value error, must not be blank"), line


@pytest.mark.parametrize("token", ["x", "s3cret-token", GOOD_TOKEN[:-1], "é" * 15])
def test_a_short_admin_token_is_refused_at_start(token: str) -> None:
    lines = refused({"admin": {"host": "0.0.0.0", "token": token}})
    assert lines[0].startswith("  admin.token: Value error, must "), lines


@pytest.mark.parametrize("token", [GOOD_TOKEN[:16] + " " + GOOD_TOKEN, GOOD_TOKEN + "é"])
def test_an_admin_token_that_no_header_can_carry_is_refused(token: str) -> None:
    (line,) = refused({"admin": {"token": token}})
    assert "admin.token: Value error, must be visible ASCII" in line


def test_a_32_byte_admin_token_is_accepted_on_any_host() -> None:
    settings = settings_from_mapping({"admin": {"host": "0.0.0.0", "token": GOOD_TOKEN}})
    assert settings.admin.token is not None
    assert settings.admin.token.get_secret_value() == GOOD_TOKEN


def test_a_blank_token_from_the_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PINPROXY_ADMIN__TOKEN", "")
    (line,) = refused({})
    assert line.startswith("  admin.token: Value error, must not be blank")


@pytest.mark.parametrize("host", [
    "127.attacker.example", "127.0.0.1.nip.io", "localhost.attacker.example", "0.0.0.0", "::",
    "10.0.0.1", "::ffff:10.0.0.1", "", "127.0.0.1.", "example.com", "[::2]",
])
def test_a_host_that_is_not_a_loopback_address_needs_a_token(host: str) -> None:
    assert not is_loopback_host(host)
    (line,) = refused({"admin": {"host": host}})
    assert "is not a loopback address: set admin.token" in line


@pytest.mark.parametrize("host", [
    "127.0.0.1", "127.1.2.3", "::1", "[::1]", "::ffff:127.0.0.1", "localhost", "LOCALHOST",
    "localhost.",
])
def test_loopback_is_decided_from_ip_addresses_and_the_one_reserved_name(host: str) -> None:
    assert is_loopback_host(host)
    assert settings_from_mapping({"admin": {"host": host}}).admin.token is None


def test_only_address_literals_are_loopback_addresses() -> None:
    # What the server checks on the sockets it bound: names never count, not even localhost.
    assert is_loopback_address("127.0.0.1")
    assert is_loopback_address("::1")
    assert not is_loopback_address("localhost")
    assert not is_loopback_address("0.0.0.0")


def test_an_admin_listener_without_a_token_may_only_have_bound_loopback_addresses() -> None:
    from proxy.runtime.instance import unguarded_addresses

    assert unguarded_addresses(False, [("127.0.0.1", 9901), ("::1", 9901, 0, 0)]) == []
    assert unguarded_addresses(False, [("127.0.0.1", 1), ("192.0.2.7", 1)]) == ["192.0.2.7"]
    assert unguarded_addresses(True, [("192.0.2.7", 1)]) == []


@pytest.mark.parametrize("value", [True, False])
def test_the_removed_trust_forwarded_headers_is_refused_naming_its_replacement(
    value: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    (line,) = refused({"listen": {"trust_forwarded_headers": value}})
    assert line.startswith("  listen.trust_forwarded_headers: Value error, was removed"), line
    assert "listen.trusted_proxies" in line
    monkeypatch.setenv("PINPROXY_LISTEN__TRUST_FORWARDED_HEADERS", "true")
    (line,) = refused({})
    assert line.startswith("  listen.trust_forwarded_headers: "), line


def test_trusted_proxies_are_cidrs() -> None:
    listen = settings_from_mapping({"listen": {"trusted_proxies": ["10.0.0.0/8", "::1"]}}).listen
    assert listen.trusted_proxies == ("10.0.0.0/8", "::1")
    assert "trust_forwarded_headers" not in listen.model_dump()
    (line,) = refused({"listen": {"trusted_proxies": ["10.0.0.0/33"]}})
    assert line.startswith("  listen.trusted_proxies: "), line


@pytest.mark.parametrize(("field", "value"), [
    ("max_request_head_bytes", 100), ("max_request_body_bytes", -1),
    ("server_header", "pinproxy\r\nX-Evil: 1"), ("server_header", " padded"),
])
def test_edge_sizes_and_the_server_header_are_validated(field: str, value: object) -> None:
    (line,) = refused({"listen": {field: value}})
    assert line.startswith(f"  listen.{field}: "), line
