"""Settings of what pinproxy reports: the audit trail, logs, metrics and traces.

Sections of ``proxy.config.Settings`` (which re-exports them), kept apart from the
routing and transport settings; ``Section`` is the base of every settings section.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

if TYPE_CHECKING:
    from collections.abc import Mapping


class Section(BaseModel):
    """A frozen settings section that refuses unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class AuditConfig(Section):
    """The per-session audit trail: the last requests of each session, kept with its pin."""

    enabled: bool = True
    # How many of a session's most recent requests are kept (Redis trims approximately,
    # reads never return more than this).
    records_per_session: Annotated[int, Field(ge=1, le=10_000)] = 100
    # Records waiting to be written. When it is full new records are dropped and counted
    # (pinproxy_audit_dropped_total): the audit never slows or fails a request.
    queue_size: Annotated[int, Field(ge=1, le=10_000_000)] = 10_000
    # Records per pipelined round trip, and how long a partial batch may wait.
    batch_size: Annotated[int, Field(ge=1, le=100_000)] = 500
    flush_interval_s: Annotated[float, Field(gt=0, le=60)] = 0.2
    # Bound on sessions with a trail when kept in memory (store.kind = "memory").
    memory_max_sessions: Annotated[int, Field(ge=1)] = 10_000


class LogConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"
    # One line per proxied request on stderr (shown as logger "pinproxy.requests"), whatever
    # ``level`` is.
    request_log: bool = True
    # Session ids appear in log lines and spans as a keyed hash unless this is set.
    raw_session_ids: bool = False
    # Key of that hash (also PINPROXY_LOG__SESSION_HASH_KEY). Set it so hashes match
    # across replicas and restarts; without it each `pinproxy serve` picks a random one.
    session_hash_key: SecretStr | None = None


def _ascending(value: tuple[float, ...]) -> tuple[float, ...]:
    if not value or any(b <= a for a, b in itertools.pairwise(value)):
        raise ValueError("must be a non-empty, strictly increasing list of seconds")
    if value[0] <= 0:
        raise ValueError("bucket bounds must be > 0")
    return value


class MetricsConfig(Section):
    # GET /metrics on the admin listener (add "/metrics" to admin.public_paths to let a
    # scraper in without the admin token).
    enabled: bool = True
    # A listener of its own that serves GET /metrics only, without a token (for a
    # cluster's Prometheus, while the admin API stays on loopback). Unset: off, and
    # metrics are on the admin listener alone.
    port: Annotated[int, Field(ge=0, le=65535)] | None = None
    host: Annotated[str, Field(min_length=1)] = "0.0.0.0"
    duration_buckets: tuple[float, ...] = (
        0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
    )
    ttfb_buckets: tuple[float, ...] = (
        0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    )

    _check_buckets = field_validator("duration_buckets", "ttfb_buckets")(_ascending)


class TracingConfig(Section):
    # OTLP/HTTP traces endpoint, e.g. "http://otel-collector:4318/v1/traces". Unset:
    # OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT, and with neither
    # no spans, and OpenTelemetry (the optional "otel" extra) is never imported.
    otlp_endpoint: str | None = None
    # Unset: OTEL_SERVICE_NAME (or OTEL_RESOURCE_ATTRIBUTES), else "pinproxy".
    service_name: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    # Fraction of new traces recorded (a client's trace follows its sampled flag).
    # Unset: OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG, else parentbased_always_on.
    sample_ratio: Annotated[float, Field(ge=0, le=1)] | None = None

    def endpoint(self, environ: Mapping[str, str]) -> str | None:
        """Where spans go, or None when tracing is off.

        On when ``otlp_endpoint`` or OpenTelemetry's own
        ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set;
        ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` turn it off.
        """
        if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return None
        if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
            return None
        if self.otlp_endpoint is not None:
            return self.otlp_endpoint
        if traces := environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip():
            return traces
        if base := environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip():
            return base.rstrip("/") + "/v1/traces"  # the exporter's own rule for a base URL
        return None

    @field_validator("otlp_endpoint")
    @classmethod
    def _http_endpoint(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError("must be an http:// or https:// URL")
        return value
