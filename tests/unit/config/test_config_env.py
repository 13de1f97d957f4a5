"""Environment overrides: a PINPROXY_* name that sets nothing is an error naming it."""

from __future__ import annotations

import pytest

from proxy.config.env import check_environment
from proxy.config.settings import Settings, settings_from_mapping
from proxy.core.errors import ConfigError


@pytest.mark.parametrize(
    "name",
    [
        "PINPROXY_LISTEN__PORT",
        "pinproxy_listen__port",  # pydantic-settings matches names case-insensitively
        "PINPROXY_ROUTING__OUTLIER__ENABLED",
        "PINPROXY_SESSIONS__PIN_TOKEN__SIGN_WITH",
        "PINPROXY_SESSIONS__PIN_TOKEN__KEYS__K1",  # inside a mapping: the mapping's business
        "PINPROXY_BACKENDS",
        "PINPROXY_ADMIN_TOKEN",  # the documented short name
        "PINPROXY_ADMIN__TOKEN",
    ],
)
def test_every_real_setting_is_accepted_from_the_environment(name: str) -> None:
    check_environment(Settings, {name: "1"})


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("PINPROXY_LISTNE__PORT", "there is no section 'listne'; did you mean 'listen'?"),
        ("PINPROXY_LISTEN__PROT", "listen has no field 'prot'; did you mean 'port'?"),
        ("PINPROXY_ROUTING__OUTLIER__ENABLD", "routing.outlier has no field 'enabld'"),
        ("PINPROXY_LISTEN__PORT__X", "listen.port is a value, not a section"),
        ("PINPROXY_", "there is no section ''"),
    ],
)
def test_a_misspelt_override_is_refused_naming_the_variable(name: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_environment(Settings, {name: "1", "PINPROXY_STORE__URL": "redis://x"})
    assert f"{name}: unknown setting" in str(err.value)
    assert says in str(err.value)
    assert "PINPROXY_STORE__URL" not in str(err.value)


def test_settings_refuse_to_load_with_a_misspelt_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PINPROXY_LISTNE__PORT", "9999")
    with pytest.raises(ConfigError, match="PINPROXY_LISTNE__PORT"):
        settings_from_mapping({})


def test_an_admin_port_equal_to_the_listen_port_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"admin\.port 9000 is also listen\.port"):
        settings_from_mapping({"listen": {"port": 9000}, "admin": {"port": 9000}})
    # Ephemeral ports (0, tests) and a disabled admin API cannot collide.
    settings_from_mapping({"listen": {"port": 0}, "admin": {"port": 0}})
    settings_from_mapping({"listen": {"port": 9000}, "admin": {"port": 9000, "enabled": False}})
