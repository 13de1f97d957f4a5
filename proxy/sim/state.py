"""What a simulated POP is told to be (``PopState``) and what it saw (records, counters)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from proxy.core.models import DIMENSIONS, Dimension, InvalidVersion, VersionBundle, check_value


class ControlError(ValueError):
    """A state update that names an unknown field or carries a value of the wrong kind."""


def _text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise ControlError(f"{name} must be a string")
    try:
        # Both end up in response header values, so they get the version alphabet.
        return check_value(name, value)
    except InvalidVersion as exc:
        raise ControlError(str(exc)) from exc


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ControlError(f"{name} must be true or false")
    return value


def _non_negative(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ControlError(f"{name} must be a number")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ControlError(f"{name} must be a finite number >= 0")
    return number


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1_000_000:
        raise ControlError(f"{name} must be an integer between 0 and 1000000")
    return value


def _status(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 400 <= value <= 599:
        raise ControlError(f"{name} must be null or an HTTP error status (400-599)")
    return value


def _dimensions(name: str, value: object) -> tuple[Dimension, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise ControlError(f"{name} must be a non-empty list of {', '.join(DIMENSIONS)}")
    unknown = [v for v in value if v not in DIMENSIONS]
    if unknown or len(set(value)) != len(value):
        raise ControlError(f"{name} must name each of {', '.join(DIMENSIONS)} at most once")
    # Canonical order, so equal sets compare equal and the state JSON is stable.
    return tuple(d for d in DIMENSIONS if d in value)


_FIELD_CHECKS: Mapping[str, Callable[[str, object], object]] = {
    "backend_id": _text,
    "region": _text,
    "ttfb_ms": _non_negative,
    "tokens_per_second": _non_negative,
    "completion_tokens": _count,
    "stamp": _flag,
    "strict": _flag,
    "key_dimensions": _dimensions,
    "version_endpoint_ok": _flag,
    "fail_status": _status,
    "json_valid": _flag,
    "json_invalid_every": _count,
}


def _merge_version(current: VersionBundle, update: object) -> VersionBundle:
    if not isinstance(update, Mapping):
        raise ControlError('version must be an object such as {"prompt": "v47"}')
    unknown = sorted(str(k) for k in update if k not in DIMENSIONS)
    if unknown:
        raise ControlError(f"unknown version dimension(s): {', '.join(unknown)}")
    merged: dict[str, object] = dict(current.as_dict())
    merged.update(update)
    for dim, value in merged.items():
        if value is not None and not isinstance(value, str):
            raise ControlError(f"version.{dim} must be a string or null")
    try:
        return VersionBundle.from_mapping(merged)
    except InvalidVersion as exc:
        raise ControlError(str(exc)) from exc


@dataclass(slots=True)
class PopState:
    """Everything a simulated POP does, changeable while it runs.

    Mutate fields directly from Python, or send partial updates with ``apply`` (which is
    what ``POST /_sim/control`` does). A request sees the state as it was when the
    request arrived, so a flip never changes a response already being produced.
    """

    backend_id: str
    region: str
    version: VersionBundle
    ttfb_ms: float = 0.0
    tokens_per_second: float = 0.0
    completion_tokens: int = 8
    stamp: bool = True
    strict: bool = False
    key_dimensions: tuple[Dimension, ...] = DIMENSIONS
    version_endpoint_ok: bool = True
    fail_status: int | None = None
    json_valid: bool = True
    # Every n-th JSON-mode answer of this POP does not parse (0: none): a failure rate
    # of 1/n, deterministic, for the soak judge and the kill-switch bench.
    json_invalid_every: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.version, VersionBundle):
            raise TypeError("version must be a VersionBundle")
        for name, check in _FIELD_CHECKS.items():
            try:
                object.__setattr__(self, name, check(name, getattr(self, name)))
            except ControlError as exc:
                raise ValueError(str(exc)) from exc

    @classmethod
    def create(
        cls,
        backend_id: str,
        region: str,
        prompt: str,
        *,
        parser: str | None = None,
        tools: str | None = None,
        model: str | None = None,
        version: VersionBundle | None = None,
        **fields: Any,
    ) -> PopState:
        """Build a state from flat arguments; ``version``, if given, replaces the bundle
        built from ``prompt``/``parser``/``tools``/``model`` (it cannot be mixed with the
        last three)."""
        if version is None:
            version = VersionBundle(prompt=prompt, parser=parser, tools=tools, model=model)
        elif parser is not None or tools is not None or model is not None:
            raise TypeError("pass either version= or parser=/tools=/model=, not both")
        return cls(backend_id=backend_id, region=region, version=version, **fields)

    @property
    def version_key(self) -> str:
        """The canonical key over all dimensions (what a proxy pins sessions to)."""
        return self.version.key()

    @property
    def strict_key(self) -> str:
        """The key over ``key_dimensions`` that ``X-Pinned-Version`` must equal under ``strict``."""
        return self.version.key(self.key_dimensions)

    def apply(self, updates: Mapping[str, object]) -> None:
        """Apply a partial update, all or nothing; raises ``ControlError``.

        ``version`` merges: ``{"version": {"prompt": "v47"}}`` keeps the other
        dimensions, and a null value removes a dimension.
        """
        unknown = sorted(str(k) for k in updates if k != "version" and k not in _FIELD_CHECKS)
        if unknown:
            raise ControlError(f"unknown field(s): {', '.join(unknown)}")
        checked: dict[str, object] = {}
        for name, value in updates.items():
            if name == "version":
                checked[name] = _merge_version(self.version, value)
            else:
                checked[name] = _FIELD_CHECKS[name](name, value)
        for name, value in checked.items():
            setattr(self, name, value)

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend_id": self.backend_id,
            "region": self.region,
            "version": self.version.as_dict(),
            "version_key": self.version_key,
            "strict_key": self.strict_key,
            "ttfb_ms": self.ttfb_ms,
            "tokens_per_second": self.tokens_per_second,
            "completion_tokens": self.completion_tokens,
            "stamp": self.stamp,
            "strict": self.strict,
            "key_dimensions": list(self.key_dimensions),
            "version_endpoint_ok": self.version_endpoint_ok,
            "fail_status": self.fail_status,
            "json_valid": self.json_valid,
            "json_invalid_every": self.json_invalid_every,
        }


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One API request as the POP received it (``/version`` and ``/_sim/*`` excluded).

    ``path`` and ``query_string`` are exactly as sent (not percent-decoded);
    ``version_key`` is what the POP was serving when the request arrived.
    """

    at: float
    method: str
    path: str
    session_id: str | None
    pinned_version: str | None
    headers: Mapping[str, str]
    body_len: int
    query_string: str = ""
    version_key: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(slots=True)
class SimCounters:
    """Running totals since start (or the last reset); ``in_flight`` is a gauge."""

    requests: int = 0  # API requests received
    version_requests: int = 0
    responses: dict[int, int] = field(default_factory=dict)  # API responses by status
    streams_started: int = 0
    streams_completed: int = 0
    streams_aborted: int = 0  # the client went away mid-stream
    chunks_sent: int = 0  # paced token frames written, over all streams
    in_flight: int = 0

    def count_response(self, status: int) -> None:
        self.responses[status] = self.responses.get(status, 0) + 1

    def reset(self) -> None:
        in_flight = self.in_flight
        for f in fields(self):
            setattr(self, f.name, {} if f.name == "responses" else 0)
        self.in_flight = in_flight

    def as_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["responses"] = {str(k): v for k, v in sorted(self.responses.items())}
        return data
