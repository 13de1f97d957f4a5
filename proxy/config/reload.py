"""What a re-read config changes, and whether a running proxy may apply it (pure).

``plan_reload(old, new)`` compares two validated ``Settings`` and names every setting
that differs by its dotted path (``routing.pin_wait_ms``, ``store.url``). Only the
settings in ``LIVE`` can change while the proxy runs: the backends and the policies the
data plane decides by, each swapped as one immutable object. Everything else is built
into something that cannot change under running traffic (a bound socket, a Redis
client, worker processes, the version key's dimensions that every stored pin was
written with, the metrics registry), so a config that changes any of it is refused,
naming those settings, and the running config keeps serving.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from proxy.config.settings import Settings, load_settings, settings_from_mapping

if TYPE_CHECKING:
    from pathlib import Path

# The settings a reload applies. A path is live when it is one of these or lies under
# one. Each is read by the data plane's policies (proxy/dataplane/live_policy.py), is the
# backend list the control plane reconciles the registry with, or is the root logger's
# level.
LIVE: Final = frozenset({
    "backends",
    "limits",
    "routing.pinning",
    "routing.pin_wait_ms",
    "routing.retry_after_s",
    "routing.refusal_status",
    "routing.max_attempts",
    "routing.retry_budget_percent",
    "routing.min_retry_concurrency",
    "versions.admitted_for_new_sessions",
    "versions.retire_after_s",
    "sessions.sources",
    "sessions.required",
    "sessions.max_scan_bytes",
    "sessions.on_lost_pin",
    "sessions.lost_pin_refuse_s",
    "log.level",
    # Eval coverage: the header is read by the data plane's policies; the window and
    # the share by whoever reads the coverage (the counts themselves do not change).
    "evals",
})


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """What a reload would do: the changed settings, and those that need a restart."""

    changed: tuple[str, ...]  # dotted paths of every setting that differs, sorted
    fixed: tuple[str, ...]  # the changed ones that cannot change live (restart to apply)
    backends_added: tuple[str, ...] = ()
    backends_removed: tuple[str, ...] = ()
    backends_changed: tuple[str, ...] = ()  # same id, another URL, region or source

    @property
    def allowed(self) -> bool:
        """Whether the running proxy may apply the new config."""
        return not self.fixed

    @property
    def unchanged(self) -> bool:
        return not self.changed


def is_live(path: str) -> bool:
    """Whether the setting at dotted ``path`` can change without a restart."""
    parts = path.split(".")
    return any(".".join(parts[:n]) in LIVE for n in range(1, len(parts) + 1))


def plan_reload(old: Settings, new: Settings) -> ReloadPlan:
    """Compare the running settings with re-read ones (both already validated)."""
    changed = sorted(_differences(old.model_dump(), new.model_dump(), ""))
    before = {b.id: b for b in old.backends}
    after = {b.id: b for b in new.backends}
    return ReloadPlan(
        changed=tuple(changed),
        fixed=tuple(path for path in changed if not is_live(path)),
        backends_added=tuple(sorted(after.keys() - before.keys())),
        backends_removed=tuple(sorted(before.keys() - after.keys())),
        backends_changed=tuple(
            sorted(i for i in before.keys() & after.keys() if before[i] != after[i])
        ),
    )


def _differences(old: Any, new: Any, path: str) -> list[str]:
    """Dotted paths where ``old`` and ``new`` differ, as deep as both are sections.

    A section that is set in one and unset (None) in the other is one difference at its
    own path. Secrets compare by value (pydantic's SecretStr) but are only ever named.
    """
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[str] = []
        for key in old.keys() | new.keys():
            out += _differences(old.get(key), new.get(key), f"{path}{key}.")
        return out
    return [] if old == new else [path.rstrip(".")]


@dataclass(frozen=True, slots=True)
class ConfigSource:
    """Where the settings come from: a TOML file plus the command line's overrides.

    Called at start and by every reload, so a reload reads the file exactly as the
    start did (the environment's ``PINPROXY_*`` overrides included). Picklable: each
    worker process gets it and reloads by itself. Raises ``ConfigError``.
    """

    path: Path
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __call__(self) -> Settings:
        settings = load_settings(self.path)
        if not self.overrides:
            return settings
        data = settings.model_dump(mode="python")
        for section, fields in self.overrides.items():
            data[section].update(fields)
        if data["store"].get("password") is not None:
            data["store"]["password"] = data["store"]["password"].get_secret_value()
        return settings_from_mapping(data)
