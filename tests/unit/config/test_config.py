"""Settings: the example file loads, every error names its field, secrets stay masked."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from proxy.cli.main import main as cli_main
from proxy.config.settings import Settings, load_settings, settings_from_mapping
from proxy.core.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[3] / "config" / "example.toml"
REDIS = {"kind": "redis"}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the developer's or CI's PINPROXY_* variables out of these tests."""
    for name in list(os.environ):
        if name.upper().startswith("PINPROXY_"):
            monkeypatch.delenv(name)


def refused(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        settings_from_mapping(data)
    message = str(info.value)
    assert message.startswith("invalid configuration:\n")
    return message


def backend(bid: str = "a", url: str = "http://pop-a.internal:8000") -> dict[str, str]:
    return {"id": bid, "region": "us-east", "url": url}


# -- the example and the defaults ----------------------------------------------------


def test_example_file_loads() -> None:
    settings = load_settings(EXAMPLE)
    assert settings.listen.workers == 2
    assert settings.listen.port == 8080
    assert settings.store.kind == "redis"
    assert settings.store.url == "redis://127.0.0.1:6379/0"
    assert settings.store.password is None
    assert [(s.kind, s.name) for s in settings.sessions.sources] == [
        ("header", "X-Session-ID"),
        ("cookie", "session_id"),
        ("body", "metadata.session_id"),
        ("body", "user"),
    ]
    assert settings.versions.dimensions == ("prompt", "parser", "tools", "model")
    assert settings.versions.admitted_for_new_sessions is None
    assert settings.discovery.unhealthy_after == 3
    assert settings.discovery.healthy_after == 2
    assert settings.log.format == "json"
    assert settings.runtime.gc_freeze_after_start is True
    assert settings.runtime.gc_thresholds == (2000, 10, 1000)
    assert [(b.id, b.region, b.url) for b in settings.backends] == [
        ("us-east-1", "us-east", "http://pop.us-east.internal:8000"),
        ("eu-west-1", "eu-west", "http://pop.eu-west.internal:8000"),
        ("ap-south-1", "ap-south", "http://pop.ap-south.internal:8000"),
        ("ap-northeast-1", "ap-northeast", "http://pop.ap-northeast.internal:8000"),
    ]


def test_example_file_loads_from_a_string_path() -> None:
    assert load_settings(str(EXAMPLE)) == load_settings(EXAMPLE)


def test_defaults_are_sane() -> None:
    settings = settings_from_mapping({})
    assert settings == Settings()
    assert settings.listen.workers == 1
    assert settings.listen.port == 8080
    assert settings.store.kind == "memory"
    assert settings.store.password is None
    assert settings.store.pin_ttl_s == 86400.0
    assert settings.backends == ()
    assert [(s.kind, s.name) for s in settings.sessions.sources] == [
        ("header", "X-Session-ID"),
        ("body", "metadata.session_id"),
    ]
    assert settings.sessions.required is False
    assert settings.versions.dimensions == ("prompt", "parser", "tools", "model")
    assert settings.discovery.path == "/version"
    assert settings.discovery.unhealthy_after >= 2  # hysteresis is on by default
    assert settings.discovery.healthy_after >= 2
    assert settings.routing.pinning is True
    assert 0 < settings.routing.pin_wait_ms <= 10_000
    assert settings.log.level == "info"


def test_backend_url_trailing_slash_is_dropped() -> None:
    settings = settings_from_mapping({"backends": [backend(url="https://pop-a:8443/v1/")]})
    assert settings.backends[0].url == "https://pop-a:8443/v1"


# -- errors name the field by its dotted path ----------------------------------------------


@pytest.mark.parametrize(
    ("data", "line"),
    [
        (
            {"backends": [backend(url="ftp://pop-a")]},
            "  backends.0.url: Value error, must be an absolute http:// or https:// URL",
        ),
        (
            {"backends": [backend(), backend("b", "pop-b:8000")]},
            "  backends.1.url: Value error, must be an absolute http:// or https:// URL",
        ),
        (
            {"backends": [backend(url="http://user:pw@pop-a")]},
            "  backends.0.url: Value error, must not contain credentials",
        ),
        (
            {"backends": [backend(url="http://user@pop-a")]},
            "  backends.0.url: Value error, must not contain credentials",
        ),
        (
            {"backends": [backend(url="http://pop-a/?x=1")]},
            "  backends.0.url: Value error, must not have a query or fragment",
        ),
        (
            {"backends": [backend(url="http://pop-a/#top")]},
            "  backends.0.url: Value error, must not have a query or fragment",
        ),
        ({"backends": [backend(bid="-a")]}, "  backends.0.id: String should match pattern"),
        (
            {"listen": {"workers": 0}},
            "  listen.workers: Input should be greater than or equal to 1",
        ),
        ({"listen": {"port": 70000}}, "  listen.port: Input should be less than or equal to"),
        ({"store": {"kind": "mongo"}}, "  store.kind: Input should be 'memory' or 'redis'"),
        (
            {"store": {"url": "http://redis:6379"}},
            "  store.url: Value error, must be a redis://, rediss:// or unix:// URL",
        ),
        (
            {"sessions": {"sources": [{"kind": "header", "name": "X Session"}]}},
            "  sessions.sources.0: Value error, 'X Session' is not a valid header name",
        ),
        (
            {"sessions": {"sources": [{"kind": "header", "name": "X-Sess:ion"}]}},
            "  sessions.sources.0: Value error, 'X-Sess:ion' is not a valid header name",
        ),
        (
            {"sessions": {"sources": [{"kind": "body", "name": "metadata..id"}]}},
            "  sessions.sources.0: Value error, 'metadata..id' is not a dotted path",
        ),
        (
            {"versions": {"dimensions": ["parser", "model"]}},
            "  versions.dimensions: Value error, must include 'prompt'",
        ),
        (
            {"versions": {"dimensions": ["prompt", "prompt"]}},
            "  versions.dimensions: Value error, must not repeat a dimension",
        ),
        (
            {"versions": {"dimensions": ["prompt", "colour"]}},
            "  versions.dimensions.1: Input should be 'prompt', 'parser', 'tools' or 'model'",
        ),
        ({"discovery": {"path": "version"}}, "  discovery.path: String should match pattern"),
        (
            {"runtime": {"gc_thresholds": [700, 0, 10]}},
            "  runtime.gc_thresholds.1: Input should be greater than or equal to 1",
        ),
        ({"runtime": {"gc_thresholds": [700, 10]}}, "  runtime.gc_thresholds.2: Field required"),
    ],
)
def test_error_names_field_by_dotted_path(data: dict[str, Any], line: str) -> None:
    assert line in refused(data).splitlines()[1]


@pytest.mark.parametrize("name", ["X-Session-ID", "x_session", "Session.Id", "a!#$%&'*+^`|~"])
def test_valid_session_header_names(name: str) -> None:
    settings = settings_from_mapping({"sessions": {"sources": [{"kind": "header", "name": name}]}})
    assert settings.sessions.sources[0].name == name


def test_each_bad_field_gets_its_own_line() -> None:
    lines = refused(
        {"listen": {"workers": 0}, "store": {"kind": "mongo"}, "backends": [backend(url="x")]}
    ).splitlines()
    assert len(lines) == 4
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        "listen.workers",
        "store.kind",
        "backends.0.url",
    ]


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"listen": {"wrokers": 2}}, "listen.wrokers"),
        ({"lsiten": {"workers": 2}}, "lsiten"),
        ({"store": {"passwd": "x"}}, "store.passwd"),
        ({"backends": [{**backend(), "weight": 3}]}, "backends.0.weight"),
        (
            {"sessions": {"sources": [{"kind": "header", "name": "X-S", "x": 1}]}},
            "sessions.sources.0.x",
        ),
    ],
)
def test_unknown_fields_are_refused(data: dict[str, Any], where: str) -> None:
    assert refused(data).splitlines()[1] == f"  {where}: Extra inputs are not permitted"


# -- cross-field rules ----------------------------------------------------------------------


def test_workers_with_memory_store_refused() -> None:
    message = refused({"listen": {"workers": 2}})
    assert "listen.workers > 1 needs store.kind = 'redis'" in message


def test_workers_with_redis_store_accepted() -> None:
    settings = settings_from_mapping({"listen": {"workers": 2}, "store": REDIS})
    assert settings.listen.workers == 2


def test_workers_with_port_zero_refused() -> None:
    message = refused({"listen": {"workers": 2, "port": 0}, "store": REDIS})
    assert "listen.port must be fixed when listen.workers > 1" in message
    assert settings_from_mapping({"listen": {"workers": 1, "port": 0}}).listen.port == 0


def test_duplicate_backend_ids_refused() -> None:
    message = refused(
        {"backends": [backend("b"), backend("a"), backend("b"), backend("a"), backend("c")]}
    )
    assert message.splitlines()[1] == "  backends: duplicate id(s) a, b"


# -- environment overrides --------------------------------------------------------------------


def test_env_beats_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PINPROXY_STORE__URL", "rediss://redis.internal:6380/2")
    monkeypatch.setenv("PINPROXY_STORE__PASSWORD", "from-env")
    settings = load_settings(EXAMPLE)
    assert settings.store.url == "rediss://redis.internal:6380/2"
    assert settings.store.password is not None
    assert settings.store.password.get_secret_value() == "from-env"
    # the rest of the section still comes from the file
    assert settings.store.kind == "redis"
    assert settings.store.key_prefix == "pinproxy:"
    assert len(settings.backends) == 4


def test_env_override_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PINPROXY_STORE__KIND", "memory")
    with pytest.raises(ConfigError, match=r"listen\.workers > 1 needs store\.kind"):
        load_settings(EXAMPLE)  # the file asks for two workers


def test_bad_env_value_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PINPROXY_LISTEN__WORKERS", "many")
    with pytest.raises(ConfigError, match=r"listen\.workers: Input should be a valid integer"):
        load_settings(EXAMPLE)


# -- frozen -------------------------------------------------------------------------------------


def test_settings_are_frozen() -> None:
    settings = load_settings(EXAMPLE)
    with pytest.raises(ValidationError, match="frozen"):
        settings.listen = settings.listen  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        settings.listen.workers = 8  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        settings.backends[0].url = "http://evil"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        settings.store.password = None  # type: ignore[misc]
    assert settings.listen.workers == 2


# -- masking ------------------------------------------------------------------------------------


def test_masked_hides_password_field_and_url_password() -> None:
    settings = settings_from_mapping(
        {
            "store": {
                "kind": "redis",
                "url": "redis://pinproxy:url-secret@redis.internal:6379/0",
                "password": "field-secret",
            }
        }
    )
    masked = settings.masked()
    assert masked["store"]["password"] == "***"
    assert masked["store"]["url"] == "redis://pinproxy:***@redis.internal:6379/0"
    dumped = json.dumps(masked)
    assert "url-secret" not in dumped
    assert "field-secret" not in dumped
    # masking is a view: the settings themselves keep the secrets
    assert settings.store.url == "redis://pinproxy:url-secret@redis.internal:6379/0"
    assert settings.store.password is not None
    assert settings.store.password.get_secret_value() == "field-secret"


def test_masked_url_password_without_user_or_port() -> None:
    settings = settings_from_mapping({"store": {"kind": "redis", "url": "rediss://:s3cret@r/1"}})
    assert settings.masked()["store"]["url"] == "rediss://:***@r/1"


def test_masked_leaves_passwordless_settings_alone() -> None:
    settings = load_settings(EXAMPLE)
    masked = settings.masked()
    assert masked["store"]["url"] == "redis://127.0.0.1:6379/0"
    assert masked["store"]["password"] is None
    assert masked["listen"]["workers"] == 2
    assert masked["backends"][0]["id"] == "us-east-1"


def test_masked_hides_env_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PINPROXY_STORE__URL", "redis://:env-url-secret@redis:6379/0")
    monkeypatch.setenv("PINPROXY_STORE__PASSWORD", "env-secret")
    dumped = json.dumps(load_settings(EXAMPLE).masked())
    assert "env-url-secret" not in dumped
    assert "env-secret" not in dumped


def test_masked_hides_password_in_url_query() -> None:
    settings = settings_from_mapping(
        {"store": {"kind": "redis", "url": "redis://redis:6379/0?password=q-secret"}}
    )
    assert "q-secret" not in settings.masked()["store"]["url"]


def test_masked_keeps_ipv6_host_brackets() -> None:
    settings = settings_from_mapping(
        {"store": {"kind": "redis", "url": "redis://:pw@[::1]:6379/0"}}
    )
    assert settings.masked()["store"]["url"] == "redis://:***@[::1]:6379/0"


# -- file errors -------------------------------------------------------------------------------


def test_missing_file_is_config_error_with_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value) == f"config file not found: {path}"


def test_invalid_toml_is_config_error_with_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[listen]\nworkers = \n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value).startswith(f"{path}: not valid TOML: ")


def test_invalid_settings_in_file_are_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[store]\nkind = "mongo"\n')
    with pytest.raises(ConfigError, match=r"store\.kind: Input should be 'memory' or 'redis'"):
        load_settings(path)


def test_non_utf8_file_is_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[listen]\nhost = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=str(path)):
        load_settings(path)


def test_directory_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=str(tmp_path)):
        load_settings(tmp_path)


def test_tls_files_that_are_not_usable_pem_are_refused_at_start(tmp_path: Path) -> None:
    # The PEM itself is read where the TLS context is built at start-up (check-config and
    # serve both do it); the settings model only checks that the files exist.
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    for field, expected in (
        ("ca_file", "upstream.ca_file: not a usable CA bundle"),
        ("client_cert_file", "upstream.client_cert_file: not a usable certificate and key"),
    ):
        config = tmp_path / f"{field}.toml"
        config.write_text(f'[upstream]\n{field} = "{not_pem}"\n')
        result = CliRunner().invoke(cli_main, ["check-config", str(config)])
        assert result.exit_code == 1, result.output
        assert expected in result.output
        assert "Traceback" not in result.output
    assert "upstream.ca_file: Path does not point to a file" in refused(
        {"upstream": {"ca_file": str(tmp_path / "missing.pem")}}
    )


def test_a_client_key_without_its_certificate_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("x\n")
    assert "client_key_file needs client_cert_file" in refused(
        {"upstream": {"client_key_file": str(key)}}
    )
