"""Value types shared by every layer: version bundles, backends, snapshots, pins, decisions.

Everything here is immutable. The registry publishes a new ``Snapshot`` whenever a
backend's runtime version or health changes; readers hold whichever snapshot they
took and never see a half-applied update.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Final, Literal, get_args

if TYPE_CHECKING:
    from collections.abc import Mapping

# The version dimensions, defined here once: everything else (the settings' default,
# the stamp headers, the admin API's bodies and views, metric labels, the simulated POP)
# is derived from this literal and VersionBundle's fields, which must name the same
# dimensions in the same order (checked below at import). "prompt" is always first.
Dimension = Literal["prompt", "parser", "tools", "model"]
DIMENSIONS: Final[tuple[Dimension, ...]] = get_args(Dimension)
ReportSource = Literal["poll", "stamp", "push"]
# How the proxy learns a backend's runtime version: by polling its /version, or only
# from pushes through the admin API (for runtimes that cannot serve /version).
VersionSource = Literal["poll", "push"]

# Values end up in header values, Redis keys, metric labels and the canonical key
# itself, so they are kept to a conservative alphabet; "," and "=" are the key's
# own separators and therefore excluded.
_VALUE_RE: Final = re.compile(r"^[A-Za-z0-9._:/@+~-]{1,128}$")
VALUE_PATTERN: Final = _VALUE_RE.pattern  # for schemas (a JSON Schema / ECMA-262 regex too)

# The response stamp of each dimension: X-Prompt-Version, X-Parser-Version, ...
STAMP_HEADERS: Final[Mapping[Dimension, str]] = {
    dim: f"X-{dim.capitalize()}-Version" for dim in DIMENSIONS
}


class InvalidVersion(ValueError):
    """A version report that cannot be used (missing prompt, bad characters)."""


def check_value(dimension: str, value: str) -> str:
    if not _VALUE_RE.fullmatch(value):
        raise InvalidVersion(
            f"{dimension} version {value[:40]!r} must be 1-128 characters of "
            "letters, digits and . _ : / @ + ~ -"
        )
    return value


@dataclass(frozen=True, slots=True)
class VersionBundle:
    """What a backend's runtime reports it serves: prompt, parser, tools, model."""

    prompt: str
    parser: str | None = None
    tools: str | None = None
    model: str | None = None

    def __post_init__(self) -> None:
        for dim in DIMENSIONS:
            value = getattr(self, dim)
            if value is not None:
                check_value(dim, value)

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> VersionBundle:
        """Build from a ``/version`` JSON document; unknown keys are ignored."""
        values: dict[str, str | None] = {}
        for dim in DIMENSIONS:
            raw = data.get(dim)
            if raw is None:
                values[dim] = None
            elif isinstance(raw, str | int) and not isinstance(raw, bool):
                values[dim] = str(raw)
            else:
                raise InvalidVersion(f"{dim} version must be a string, got {type(raw).__name__}")
        prompt = values.pop("prompt")
        if prompt is None:
            raise InvalidVersion("a version report must include 'prompt'")
        return cls(prompt=prompt, **values)

    def key(self, dimensions: tuple[Dimension, ...] = DIMENSIONS) -> str:
        """Canonical version key over ``dimensions``: the identity a session pins to.

        Only dimensions the backend reports take part, in the fixed DIMENSIONS order,
        so the same runtime always yields the same key whatever order it reported in.
        """
        parts = [
            f"{dim}={value}"
            for dim in DIMENSIONS
            if dim in dimensions and (value := getattr(self, dim)) is not None
        ]
        return ",".join(parts)

    def overlay(self, stamp: Mapping[Dimension, str]) -> VersionBundle:
        """This bundle with the dimensions a response stamp carries replaced.

        A stamp that names only the prompt says nothing about the parser; it must not
        be read as "parser unset", or every partially stamping backend would look
        like it flipped on every response.
        """
        values: dict[str, str | None] = {dim: getattr(self, dim) for dim in DIMENSIONS}
        for dim, value in stamp.items():
            values[dim] = value
        prompt = values.pop("prompt")
        assert prompt is not None
        return VersionBundle(prompt=prompt, **values)

    def as_dict(self) -> dict[str, str]:
        return {dim: v for dim in DIMENSIONS if (v := getattr(self, dim)) is not None}


# One definition of the dimensions: the bundle's fields are the literal's names.
if tuple(f.name for f in fields(VersionBundle)) != DIMENSIONS:  # pragma: no cover
    raise TypeError("VersionBundle's fields must be the Dimension literal's names, in order")


def prompt_of(version_key: str) -> str:
    """The prompt dimension of a canonical key (what ``X-Prompt-Version`` carries)."""
    for part in version_key.split(","):
        name, _, value = part.partition("=")
        if name == "prompt":
            return value
    return version_key


@dataclass(frozen=True, slots=True)
class Backend:
    """A configured upstream POP: where it is, not what it runs."""

    id: str
    region: str
    url: str  # base URL without a trailing slash, e.g. "http://10.0.0.5:8000"
    version_source: VersionSource = "poll"


@dataclass(frozen=True, slots=True)
class BackendState:
    """One backend as the registry currently believes it to be."""

    backend: Backend
    version: VersionBundle | None = None
    version_key: str | None = None
    healthy: bool = False
    draining: bool = False
    reported_at: float | None = None  # wall-clock seconds of the last version report
    report_source: ReportSource | None = None
    # What the rollout controller says it deployed; shown beside the runtime report
    # (disagreement is drift) but never used for routing: the runtime wins (invariant 2).
    intended: VersionBundle | None = None
    # Outlier detection: not routed before this wall-clock time (0: not ejected).
    ejected_until: float = 0.0

    @property
    def id(self) -> str:
        return self.backend.id

    @property
    def region(self) -> str:
        return self.backend.region

    @property
    def routable(self) -> bool:
        return self.healthy and self.version_key is not None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An immutable view of the fleet that routing decides over.

    ``version_last_seen`` holds, for every version key any backend has reported since
    this process started, the wall-clock time it was last reported; it is what decides
    when a pinned version is retired.
    """

    backends: tuple[BackendState, ...] = ()
    generation: int = 0
    started_at: float = 0.0
    version_last_seen: Mapping[str, float] = field(default_factory=dict)
    # Version keys or bare prompt versions an operator blocked for new sessions (the
    # kill switch); sessions already pinned to them are still served.
    blocked_versions: frozenset[str] = frozenset()
    # Rollout discipline (proxy/core/rollout.py): per atomic region, the only version its
    # backends serve to new sessions; and rolled-back version -> where its sessions go.
    region_current: Mapping[str, str] = field(default_factory=dict)
    rollbacks: Mapping[str, str] = field(default_factory=dict)
    by_id: Mapping[str, BackendState] = field(init=False, repr=False, compare=False)
    by_key: Mapping[str, tuple[BackendState, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_key: dict[str, list[BackendState]] = {}
        for state in self.backends:
            if state.version_key is not None:
                by_key.setdefault(state.version_key, []).append(state)
        object.__setattr__(self, "by_id", {s.id: s for s in self.backends})
        object.__setattr__(self, "by_key", {k: tuple(v) for k, v in by_key.items()})

    def last_seen(self, version_key: str) -> float:
        return self.version_last_seen.get(version_key, self.started_at)

    def blocks(self, version_key: str) -> bool:
        """Whether new sessions are refused ``version_key`` (by full key or by its prompt)."""
        blocked = self.blocked_versions
        return bool(blocked) and (version_key in blocked or prompt_of(version_key) in blocked)

    def serving_keys(self) -> frozenset[str]:
        """Version keys with at least one healthy backend right now."""
        return frozenset(s.version_key for s in self.backends if s.routable and s.version_key)


@dataclass(frozen=True, slots=True)
class Pin:
    """A session's pin: the version key it was first served, and where."""

    version_key: str
    backend_id: str
    region: str
    pinned_at: float  # wall-clock seconds


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What routing needs to know about a request (nothing that needs I/O)."""

    session_id: str | None
    exclude: frozenset[str] = frozenset()  # backend ids already tried for this request


@dataclass(frozen=True, slots=True)
class Forward:
    """Send the request to ``backend``; the session is (or will be) pinned to ``version_key``.

    ``new_pin`` says the session has no pin yet and one must be written before sending.
    ``repin_from`` is set when the session's pinned version was retired and this
    decision moves it to ``version_key``.
    """

    backend: BackendState
    version_key: str
    new_pin: bool = False
    repin_from: str | None = None
    repin_reason: Literal["retired", "rollback"] = "retired"


@dataclass(frozen=True, slots=True)
class Unavailable:
    """No backend may take this request now.

    ``version_key`` is the pinned version that has no healthy backend (None when there is
    no routable backend at all for an unpinned or new session).
    """

    version_key: str | None
    reason: Literal["version_unavailable", "no_backends"]


RouteDecision = Forward | Unavailable
