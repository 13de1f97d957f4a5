"""Start-up warnings: valid settings that are probably not what the operator meant."""

from __future__ import annotations

from proxy.config.settings import settings_from_mapping
from proxy.runtime.preflight import startup_warnings

BACKEND = {"id": "a", "region": "r", "url": "http://127.0.0.1:1"}


def test_no_warning_for_backends_and_the_default_health_paths() -> None:
    assert startup_warnings(settings_from_mapping({"backends": [BACKEND]})) == []


def test_zero_backends_are_warned_about() -> None:
    (warning,) = startup_warnings(settings_from_mapping({}))
    assert warning.startswith("no backends are configured")


def test_a_health_path_outside_the_reserved_prefix_is_warned_about() -> None:
    settings = settings_from_mapping(
        {"backends": [BACKEND], "listen": {"health_path": "/v1/models", "ready_path": "/ready"}}
    )
    warnings = startup_warnings(settings)
    assert len(warnings) == 2
    assert "listen.health_path '/v1/models' is outside /_pinproxy/" in warnings[0]
    assert "listen.ready_path '/ready'" in warnings[1]
