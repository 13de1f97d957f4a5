"""plan_reload: what a re-read config changes, and whether it may change live."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from proxy.config.reload import LIVE, ConfigSource, is_live, plan_reload
from proxy.config.settings import Settings, settings_from_mapping
from proxy.core.errors import ConfigError

BACKENDS = [
    {"id": "a", "region": "r1", "url": "http://127.0.0.1:9001"},
    {"id": "b", "region": "r1", "url": "http://127.0.0.1:9002"},
]


def settings(**sections: Any) -> Settings:
    data: dict[str, Any] = {"backends": BACKENDS, **sections}
    return settings_from_mapping(data)


def test_the_same_config_changes_nothing_and_is_allowed() -> None:
    plan = plan_reload(settings(), settings())
    assert plan.unchanged
    assert plan.allowed
    assert plan.changed == ()
    assert plan.fixed == ()


def test_backends_added_removed_and_changed_are_live_and_listed() -> None:
    new = [
        {"id": "a", "region": "r1", "url": "http://127.0.0.1:9101"},  # another URL
        {"id": "c", "region": "r2", "url": "http://127.0.0.1:9003"},
    ]
    plan = plan_reload(settings(), settings(backends=new))
    assert plan.allowed
    assert plan.changed == ("backends",)
    assert (plan.backends_added, plan.backends_removed, plan.backends_changed) == (
        ("c",), ("b",), ("a",)
    )


def test_routing_and_session_policies_change_live() -> None:
    new = settings(
        routing={"pin_wait_ms": 100, "max_attempts": 2},
        versions={"admitted_for_new_sessions": ["v2"]},
        sessions={"required": True, "on_lost_pin": "mark"},
        log={"level": "debug"},
    )
    plan = plan_reload(settings(), new)
    assert plan.allowed
    assert plan.changed == (
        "log.level", "routing.max_attempts", "routing.pin_wait_ms", "sessions.on_lost_pin",
        "sessions.required", "versions.admitted_for_new_sessions",
    )


@pytest.mark.parametrize(
    ("sections", "fixed"),
    [
        ({"listen": {"port": 9999}}, ("listen.port",)),
        ({"listen": {"host": "127.0.0.2", "workers": 2},
          "store": {"kind": "redis", "url": "redis://127.0.0.1:7000/0"}},
         ("listen.host", "listen.workers", "store.kind", "store.url")),
        ({"versions": {"dimensions": ["prompt"]}}, ("versions.dimensions",)),
        ({"metrics": {"enabled": False}, "routing": {"pin_wait_ms": 10}}, ("metrics.enabled",)),
        ({"routing": {"outlier": {"consecutive_failures": 2}}},
         ("routing.outlier.consecutive_failures",)),
    ],
)
def test_settings_that_need_a_restart_are_named_and_refuse_the_reload(
    sections: dict[str, Any], fixed: tuple[str, ...]
) -> None:
    plan = plan_reload(settings(), settings(**sections))
    assert not plan.allowed
    assert plan.fixed == fixed
    assert set(fixed) <= set(plan.changed)


def test_a_changed_secret_is_named_never_shown() -> None:
    old = settings(admin={"token": "x" * 32})
    new = settings(admin={"token": "y" * 32})
    plan = plan_reload(old, new)
    assert plan.fixed == ("admin.token",)
    assert "xxxx" not in repr(plan)
    assert "yyyy" not in repr(plan)
    assert plan_reload(old, settings(admin={"token": "x" * 32})).unchanged


def test_a_section_set_where_it_was_unset_is_one_difference() -> None:
    token = {"keys": {"k1": "s" * 32}, "sign_with": "k1"}
    plan = plan_reload(settings(), settings(sessions={"pin_token": token}))
    assert plan.changed == ("sessions.pin_token",)
    assert plan.fixed == ("sessions.pin_token",)


def _leaf_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    paths = set()
    for name, field in model.model_fields.items():
        paths.add(prefix + name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths |= _leaf_paths(annotation, f"{prefix}{name}.")
    return paths


def test_every_live_setting_names_a_real_field() -> None:
    # A renamed setting must not silently stop being reloadable (or become so).
    fields = _leaf_paths(Settings)
    assert sorted(LIVE - fields) == []
    assert is_live("backends")
    assert is_live("routing.pin_wait_ms")
    assert not is_live("routing")
    assert not is_live("routing.outlier.enabled")


def test_the_config_source_reads_the_file_with_the_command_line_overrides(
    tmp_path: Any,
) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[listen]\nport = 8081\n[routing]\npin_wait_ms = 300\n')
    source = ConfigSource(path, {"listen": {"port": 9000}})
    loaded = source()
    assert (loaded.listen.port, loaded.routing.pin_wait_ms) == (9000, 300)
    path.write_text('[routing]\npin_wait_ms = -1\nmax_attempts = 0\n')
    with pytest.raises(ConfigError, match=r"routing\.pin_wait_ms") as refused:
        source()
    assert refused.value.fields == ("routing.pin_wait_ms", "routing.max_attempts")


def test_the_eval_coverage_settings_change_live() -> None:
    new = settings(evals={"header": "X-Eval-Batch", "window_s": 600,
                          "min_production_share": 0.2})
    plan = plan_reload(settings(), new)
    assert plan.allowed
    assert plan.changed == ("evals.header", "evals.min_production_share", "evals.window_s")
    assert plan_reload(settings(), settings(evals={"header": None})).allowed
