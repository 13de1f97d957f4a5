"""Settings: one frozen, validated model, loaded once at start.

A TOML file gives the settings; environment variables ``PINPROXY_<SECTION>__<FIELD>``
override single fields (e.g. ``PINPROXY_STORE__URL``), which is how a sidecar gets
its Redis address and password without rewriting the file. Invalid settings raise
``ConfigError`` with one line per offending field, named by its dotted path. The
sections of what pinproxy reports (audit, log, metrics, tracing) live in
config_telemetry.py, those of the two listeners (listen, admin) in config_listen.py.
"""

from __future__ import annotations

import os
import re
import tomllib
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import (
    Field,
    FilePath,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from proxy.config.env import check_environment
from proxy.config.limits import LimitsConfig
from proxy.config.listen import AdminConfig as AdminConfig
from proxy.config.listen import ListenConfig as ListenConfig
from proxy.config.observability import AuditConfig, LogConfig, MetricsConfig, Section, TracingConfig
from proxy.config.rollout import EvalsConfig, RolloutConfig
from proxy.config.store import StoreConfig
from proxy.core.errors import ConfigError
from proxy.core.models import DIMENSIONS, Backend, Dimension, VersionSource

if TYPE_CHECKING:
    from pathlib import Path

_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class RuntimeConfig(Section):
    # Python's cyclic collector stops the event loop while it runs, and a full (gen 2)
    # collection walks every live container: with thousands of streams in flight, a
    # stall every stream in flight sees. Freezing what start-up allocated (config,
    # metrics, imported modules) takes it out of every later walk, and a high third
    # threshold makes full collections rare; reference counting still frees almost
    # everything a request allocates. (700, 10, 10) is Python's default; a larger first
    # threshold promotes fewer short-lived objects into generation 1, whose collections
    # were the remaining stalls. Measured: bench/RESULTS.md, the GC row.
    gc_freeze_after_start: bool = True
    gc_thresholds: tuple[
        Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]
    ] = (2000, 10, 1000)


class SessionSource(Section):
    kind: Literal["header", "cookie", "body"]
    # Header or cookie name, or a dotted path into the JSON body ("metadata.session_id").
    name: Annotated[str, Field(min_length=1, max_length=200)]

    @model_validator(mode="after")
    def _valid_name(self) -> Self:
        if self.kind == "header" and not _HEADER_NAME.fullmatch(self.name):
            raise ValueError(f"{self.name!r} is not a valid header name")
        if self.kind == "body" and any(not part for part in self.name.split(".")):
            raise ValueError(f"{self.name!r} is not a dotted path like 'metadata.session_id'")
        return self


def _default_sources() -> tuple[SessionSource, ...]:
    return (
        SessionSource(kind="header", name="X-Session-ID"),
        SessionSource(kind="body", name="metadata.session_id"),
    )


class PinTokenConfig(Section):
    """Signed pin tokens (opt-in): the pin travels with the client (proxy/policy/pin_token.py)."""

    # Signing keys by key id; a token signed with any of them is honoured, new tokens
    # are signed with ``sign_with``. To rotate: add the new key, move sign_with to it,
    # drop the old key once max_age_s has passed.
    keys: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,16}$")], SecretStr]
    sign_with: str
    # Where the token goes on answers and is read from on requests (either or both).
    header: Annotated[str, Field(pattern=_HEADER_NAME.pattern)] | None = "X-Pin-Token"
    cookie: Annotated[str, Field(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")] | None = None
    # A token older than this is ignored (and counted); answers refresh it after half.
    max_age_s: Annotated[float, Field(gt=0, le=30 * 86_400)] = 86_400.0

    @model_validator(mode="after")
    def _usable(self) -> Self:
        if self.sign_with not in self.keys:
            raise ValueError(f"sign_with {self.sign_with!r} is not one of the keys")
        short = sorted(k for k, v in self.keys.items() if len(v.get_secret_value()) < 32)
        if short:
            raise ValueError(f"keys shorter than 32 characters: {', '.join(short)}")
        if self.header is None and self.cookie is None:
            raise ValueError("set header, cookie or both")
        return self


class SessionsConfig(Section):
    sources: tuple[SessionSource, ...] = Field(default_factory=_default_sources)
    # Without a session id a request is routed by latency and not pinned, unless this
    # is set, in which case it gets 400.
    required: bool = False
    max_id_bytes: Annotated[int, Field(gt=0, le=4096)] = 256
    # A body a body source must read is held until its id is settled; one still
    # unsettled past this many bytes is refused (413), never forwarded unpinned.
    max_scan_bytes: Annotated[int, Field(ge=0, le=1 << 30)] = 32 * 1024 * 1024
    # A continuing conversation (an earlier answer in the request) that finds no pin:
    # "refuse" answers 503 pin_lost while the store lost data within lost_pin_refuse_s
    # (None: always), since a replica holding the pin is writing it back; "mark" pins it
    # afresh and marks the answer "unknown -> <key>". See proxy/dataplane/lost_pin.py.
    on_lost_pin: Literal["mark", "refuse"] = "refuse"
    lost_pin_refuse_s: Annotated[float, Field(gt=0, le=86_400)] | None = 30.0
    pin_token: PinTokenConfig | None = None


class VersionsConfig(Section):
    # The dimensions that make up the version key sessions pin to.
    dimensions: tuple[Dimension, ...] = DIMENSIONS
    # Version keys (or bare prompt versions) new sessions may be pinned to; None: all.
    admitted_for_new_sessions: tuple[str, ...] | None = None
    # A pinned version that no backend has reported for this long is retired: its
    # sessions are explicitly repinned to a new-session choice.
    retire_after_s: Annotated[float, Field(gt=0)] = 600.0
    # Session-aware draining: a session counts as active on its version while its last
    # request is at most this old (GET /admin/versions, pinproxy_version_active_sessions).
    active_window_s: Annotated[float, Field(gt=0, le=7 * 86_400)] = 900.0

    @field_validator("dimensions")
    @classmethod
    def _dimensions(cls, value: tuple[Dimension, ...]) -> tuple[Dimension, ...]:
        if "prompt" not in value:
            raise ValueError("must include 'prompt'")
        if len(set(value)) != len(value):
            raise ValueError("must not repeat a dimension")
        return value


class DiscoveryConfig(Section):
    path: Annotated[str, Field(pattern=r"^/[^?#]*$")] = "/version"
    interval_s: Annotated[float, Field(gt=0, le=3600)] = 2.0
    jitter: Annotated[float, Field(ge=0, lt=1)] = 0.2  # fraction of the interval
    timeout_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    unhealthy_after: Annotated[int, Field(ge=1, le=100)] = 3
    healthy_after: Annotated[int, Field(ge=1, le=100)] = 2


class OutlierConfig(Section):
    """Outlier detection (proxy/core/outlier.py): eject backends whose requests keep failing."""

    enabled: bool = True
    # 5xx heads, timeouts, broken heads and failed connections in a row that eject.
    consecutive_failures: Annotated[int, Field(ge=1, le=1000)] = 5
    # The n-th ejection in a row lasts n x this, at most max_ejection_s.
    base_ejection_s: Annotated[float, Field(gt=0, le=3600)] = 10.0
    max_ejection_s: Annotated[float, Field(gt=0, le=86_400)] = 300.0
    # Share of one version's backends that may be out at once (rounded down).
    max_ejected_percent: Annotated[int, Field(ge=0, le=100)] = 50


class RoutingConfig(Section):
    # Off turns pinproxy into a plain latency router (the control in bench/incident).
    pinning: bool = True
    pin_wait_ms: Annotated[int, Field(ge=0, le=120_000)] = 2000
    retry_after_s: Annotated[int, Field(ge=1, le=3600)] = 2
    # The status a cooperating backend answers to a request whose X-Pinned-Version it
    # does not serve: never relayed, the next backend of the pinned version is asked.
    # 0 turns refusals off (the status is then relayed like any other).
    refusal_status: Annotated[int, Field(ge=0, le=599)] = 409
    # Sends per request in all (refused connections, mismatches, refusals, replays).
    max_attempts: Annotated[int, Field(ge=1, le=20)] = 5
    # Replays of requests already written (idempotent ones only) are allowed while
    # fewer than this share of active requests, or min_retry_concurrency, are retrying.
    retry_budget_percent: Annotated[float, Field(ge=0, le=100)] = 20.0
    min_retry_concurrency: Annotated[int, Field(ge=0)] = 3
    outlier: OutlierConfig = OutlierConfig()

    @field_validator("refusal_status")
    @classmethod
    def _error_status(cls, value: int) -> int:
        if value and not 400 <= value <= 599:
            raise ValueError("must be 0 (off) or an error status, 400-599")
        return value
    # Time constant of the peak-EWMA latency estimate: how fast an old slowdown is forgotten.
    ewma_decay_s: Annotated[float, Field(gt=0, le=3600)] = 10.0
    # Assumed time-to-first-byte of a backend that has not been measured yet.
    initial_latency_ms: Annotated[float, Field(gt=0)] = 50.0


class UpstreamConfig(Section):
    connect_timeout_s: Annotated[float, Field(gt=0, le=120)] = 2.0
    # Longest silence allowed between two reads of a response (head or body chunk).
    # A stream has no total deadline: long generations are normal.
    read_idle_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 120.0
    pool_size: Annotated[int, Field(ge=1)] = 1000
    pool_size_per_host: Annotated[int, Field(ge=0)] = 0  # 0: no per-host limit
    # A pooled connection is lent again only after this long without a byte since its
    # last response ended: a stray response written after a complete one then closes
    # the connection instead of reaching the next request (0: lend at once).
    reuse_quiet_ms: Annotated[int, Field(ge=0, le=10_000)] = 100
    # Request bodies up to this size are held in memory so the request can be retried
    # (mismatch guard, refused connection) and a session id read from them. Larger
    # bodies stream straight through and cannot be retried. 0 streams everything.
    max_buffered_body_bytes: Annotated[int, Field(ge=0)] = 4 * 1024 * 1024
    # A response head (status line, headers, any interim 1xx heads before it) over
    # max_response_head_bytes, or with more than max_response_headers headers, is never
    # relayed: the connection is closed and the client gets 502 upstream_head_too_large.
    # Envoy's defaults: 60 KiB and 100 headers.
    max_response_head_bytes: Annotated[int, Field(ge=1024, le=16 * 1024 * 1024)] = 64 * 1024
    max_response_headers: Annotated[int, Field(ge=1, le=10_000)] = 100
    # TLS to https backends: the system's CAs, or the PEM bundle in ca_file (a private
    # CA); client_cert_file (with client_key_file, unless the key is in it) for mTLS.
    ca_file: FilePath | None = None
    client_cert_file: FilePath | None = None
    client_key_file: FilePath | None = None

    @model_validator(mode="after")
    def _usable_tls_files(self) -> Self:
        if self.client_key_file is not None and self.client_cert_file is None:
            raise ValueError("client_key_file needs client_cert_file")
        # Whether the files are usable PEM is checked at start-up, where the TLS context
        # is built (proxy.upstream.tls), not here: config stays pure and below upstream.
        return self


class BackendConfig(Section):
    id: Annotated[str, Field(pattern=_ID)]
    region: Annotated[str, Field(pattern=_ID)]
    url: str
    # "push": the runtime cannot serve /version, so it is not polled; its version comes
    # from PUT /admin/backends/{id}/runtime-version (and response stamps).
    version_source: VersionSource = "poll"

    @field_validator("url")
    @classmethod
    def _http_base_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http:// or https:// URL")
        if "\\" in value:
            raise ValueError("must not contain a backslash (aiohttp's client refuses it)")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not contain credentials")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        try:
            port = parts.port  # read lazily by urlsplit: the clients would fail on it
        except ValueError as exc:
            raise ValueError(f"has an invalid port: {exc}") from exc
        if port == 0:
            raise ValueError("port must be 1-65535")
        return value.rstrip("/")


class Settings(BaseSettings):
    """Every setting pinproxy has; see config/example.toml for a commented example."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        env_prefix="PINPROXY_",
        env_nested_delimiter="__",
    )

    listen: ListenConfig = ListenConfig()
    limits: LimitsConfig = LimitsConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    store: StoreConfig = StoreConfig()
    sessions: SessionsConfig = SessionsConfig()
    versions: VersionsConfig = VersionsConfig()
    discovery: DiscoveryConfig = DiscoveryConfig()
    routing: RoutingConfig = RoutingConfig()
    rollout: RolloutConfig = RolloutConfig()
    evals: EvalsConfig = EvalsConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    backends: tuple[BackendConfig, ...] = ()
    admin: AdminConfig = AdminConfig()
    audit: AuditConfig = AuditConfig()
    log: LogConfig = LogConfig()
    metrics: MetricsConfig = MetricsConfig()
    tracing: TracingConfig = TracingConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file (the file arrives as init kwargs).
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.listen.workers > 1 and self.store.kind != "redis":
            raise ValueError(
                "listen.workers > 1 needs store.kind = 'redis': with the in-memory store each "
                "worker would keep its own pins and a session could be pinned twice"
            )
        if self.listen.workers > 1 and self.listen.port == 0:
            raise ValueError("listen.port must be fixed when listen.workers > 1 (they share it)")
        if self.admin.enabled and self.admin.port != 0 and self.admin.port == self.listen.port:
            raise ValueError(
                f"admin.port {self.admin.port} is also listen.port: the admin API and the "
                "data plane need ports of their own"
            )
        if self.listen.workers > 1 and self.admin.enabled and self.admin.port == 0:
            raise ValueError("admin.port must be fixed when listen.workers > 1 (they share it)")
        metrics_port = self.metrics.port
        if metrics_port is not None:
            if self.listen.workers > 1 and metrics_port == 0:
                raise ValueError(
                    "metrics.port must be fixed when listen.workers > 1 (they share it)")
            taken = {self.listen.port, *((self.admin.port,) if self.admin.enabled else ())}
            if metrics_port != 0 and metrics_port in taken:
                raise ValueError("metrics.port must differ from listen.port and admin.port")
        ids = [b.id for b in self.backends]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"backends: duplicate id(s) {', '.join(duplicates)}")
        return self

    def backend_models(self) -> tuple[Backend, ...]:
        """The configured backends as the registry's value type."""
        return tuple(
            Backend(id=b.id, region=b.region, url=b.url, version_source=b.version_source)
            for b in self.backends
        )

    def masked(self) -> dict[str, Any]:
        """The resolved settings as plain data, with secrets masked (for check-config)."""
        data = self.model_dump(mode="json")
        data["store"]["url"] = self.store.masked_url()
        for secret in ("password", "sentinel_password"):
            if getattr(self.store, secret) is not None:
                data["store"][secret] = "***"
        if self.admin.token is not None:
            data["admin"]["token"] = "***"
        if self.log.session_hash_key is not None:
            data["log"]["session_hash_key"] = "***"
        if (tokens := self.sessions.pin_token) is not None:
            data["sessions"]["pin_token"]["keys"] = dict.fromkeys(tokens.keys, "***")
        return data


def _describe(exc: ValidationError) -> ConfigError:
    lines, fields = [], []
    for err in exc.errors():
        if not err["loc"]:
            # A rule across sections (Settings._consistent): its message names the fields.
            lines.append(f"  {err['msg'].removeprefix('Value error, ')}")
            continue
        where = ".".join(str(p) for p in err["loc"])
        lines.append(f"  {where}: {err['msg']}")
        fields.append(where)
    error = ConfigError("invalid configuration:\n" + "\n".join(lines))
    error.fields = tuple(dict.fromkeys(fields))  # each once, in order
    return error


def settings_from_mapping(data: dict[str, Any]) -> Settings:
    # pydantic-settings would ignore a misspelt override; it is an error like a bad field.
    check_environment(Settings, os.environ)
    token = os.environ.get("PINPROXY_ADMIN_TOKEN")
    if token:
        # The documented short name for the one secret most deployments inject.
        data = {**data, "admin": {**data.get("admin", {}), "token": token}}
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise _describe(exc) from exc


def load_settings(path: str | Path) -> Settings:
    """Read, validate and freeze the settings in the TOML file at ``path``."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return settings_from_mapping(data)
