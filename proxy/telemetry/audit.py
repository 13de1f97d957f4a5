"""The per-session audit trail: which request of a session went where, on which version.

Theory of operation
-------------------
The data plane hands every finished request to its observers (``proxy.events``);
``AuditObserver`` offers those that carry a session id to the audit log. Offering is
O(1) and never awaits or raises, because it runs inline on the request path
(invariant 4: nothing on the hot path waits on work that can happen later).

The log is offered a tuple of the event's audit fields (``raw_record``), not a record:
the record's JSON is made straight from the tuple when a batch is written (the records
of one Redis script call as one JSON array in one orjson call, ``entries_json``; one
record alone, ``entry_json``, gives the same bytes), and in memory an ``AuditRecord``
is made only when a trail is read (``record_of``). A request pays for a tuple and a
queue append; most records are written and never read back as objects (bench/RESULTS.md,
issue 14 telemetry round).
The tuple, unlike the event, holds no request body. Records made elsewhere (a repin
from the admin API, a pin conflict) are offered as ``AuditRecord`` s.

With Redis (``RedisAudit``, in audit_redis.py) an offered record goes into a bounded
queue that a background task writes in batches; see that module.

In memory (``MemoryAudit``, for the single-process memory pin store) a record is
appended at once to its session's ``deque(maxlen=N)``: that is already O(1) and
bounded, so no queue is needed. Sessions are bounded in number (least recently
written goes first) and expire ``pin_ttl_s`` after their last record, like the pin.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeAlias

import orjson

if TYPE_CHECKING:
    from collections.abc import Iterable

    from proxy.config.observability import AuditConfig
    from proxy.core.clock import Clock
    from proxy.core.events import RequestEvent

_MAX_PATH = 200  # request paths are recorded truncated: a trail entry stays small


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One request of a session, as the audit trail keeps it."""

    at: float  # wall-clock seconds when the request arrived
    request_id: str
    trace_id: str
    method: str
    path: str
    status: int
    backend_id: str | None  # None: no backend answered (e.g. 503 before sending)
    region: str | None
    version_key: str | None  # the version that served, or the pinned one on a 503
    latency_ms: float  # until the last byte was sent (or the error answered)
    ttfb_ms: float | None = None
    version_changed: str | None = None  # "old -> new" when this request repinned
    error_type: str | None = None

    @classmethod
    def from_event(cls, event: RequestEvent) -> AuditRecord:
        return record_of(raw_record(event))

    def to_json(self) -> bytes:
        # orjson writes a dataclass's fields in order, as asdict would give them, without
        # asdict's recursive copy. The copy to exact size is cheaper than what it saves:
        # orjson's bytes keep the heap block of its larger buffer, and a batch of them held
        # until sent makes glibc grow and trim the heap each batch, in page faults
        # (bench/RESULTS.md, "Numbers behind choices in the code").
        return memoryview(orjson.dumps(self)).tobytes()

    @classmethod
    def from_json(cls, raw: bytes | str) -> AuditRecord | None:
        """The record, or None for an entry that is not one (skipped, not fatal)."""
        try:
            data = orjson.loads(raw)
            if not isinstance(data, dict):
                return None
            record = cls(**data)
        except (ValueError, TypeError):  # bad JSON, missing or unknown fields
            return None
        if not isinstance(record.request_id, str) or not isinstance(record.status, int):
            return None
        return record


# What the data plane offers per request: the record's fields as they are on the event,
# in AuditRecord's order, unrounded (the tuple is built in one step; the record and its
# rounding wait until a batch is written or a trail is read). The path is truncated
# already: MemoryAudit keeps up to 100 entries for each of 10,000 sessions.
RawRecord: TypeAlias = tuple[
    float, str, str, str, str, int, "str | None", "str | None", "str | None", float,
    "float | None", "str | None", "str | None",
]
AuditEntry: TypeAlias = "AuditRecord | RawRecord"  # what the log is offered


def raw_record(event: RequestEvent) -> RawRecord:
    """The audit fields of ``event``: no copy of its body, cheap enough to queue."""
    return (event.at, event.request_id, event.trace_id, event.method,
            event.path[:_MAX_PATH], event.status, event.backend_id, event.region,
            event.version_key, event.duration_s, event.ttfb_s, event.version_changed,
            event.error_type)


def record_of(entry: AuditEntry) -> AuditRecord:
    """The audit record of an offered entry."""
    if not isinstance(entry, tuple):
        return entry
    (at, request_id, trace_id, method, path, status, backend_id, region, version_key,
     duration_s, ttfb_s, version_changed, error_type) = entry
    return AuditRecord(
        at, request_id, trace_id, method, path, status, backend_id, region,
        version_key, round(duration_s * 1000.0, 3),
        None if ttfb_s is None else round(ttfb_s * 1000.0, 3), version_changed, error_type,
    )


def entry_value(entry: AuditEntry) -> AuditRecord | dict[str, object]:
    """What orjson writes as the entry's record: the record itself, or for a queued tuple
    a dict with AuditRecord's fields as keys, in its order (orjson keeps insertion order),
    rounded as ``record_of`` rounds them."""
    if not isinstance(entry, tuple):
        return entry
    (at, request_id, trace_id, method, path, status, backend_id, region, version_key,
     duration_s, ttfb_s, version_changed, error_type) = entry
    return {
        "at": at,
        "request_id": request_id,
        "trace_id": trace_id,
        "method": method,
        "path": path,
        "status": status,
        "backend_id": backend_id,
        "region": region,
        "version_key": version_key,
        "latency_ms": round(duration_s * 1000.0, 3),
        "ttfb_ms": None if ttfb_s is None else round(ttfb_s * 1000.0, 3),
        "version_changed": version_changed,
        "error_type": error_type,
    }


def entry_json(entry: AuditEntry) -> bytes:
    """``record_of(entry).to_json()``, made without the record.

    The same bytes (tests/unit/telemetry/test_audit.py holds them equal): orjson writes
    a dataclass's fields and a dict's keys in order, and ``entry_value``'s keys are
    AuditRecord's fields in order.
    """
    if not isinstance(entry, tuple):
        return entry.to_json()
    return memoryview(orjson.dumps(entry_value(entry))).tobytes()  # see AuditRecord.to_json


# Between two records in ``entries_json``'s array. Every record starts with the field
# "at", and its values are scalars, so "}" outside a string only ends a record, and
# orjson writes a quote inside a string as \": this sequence cannot occur inside a
# record (tests/unit/telemetry/test_audit.py splits adversarial records on it).
ENTRY_SEPARATOR = b'},{"at":'


def entries_json(entries: Iterable[AuditEntry]) -> bytes:
    """The entries' records as one JSON array, in one orjson call.

    Element i is ``entry_json`` of entry i byte for byte; splitting the array's inside
    on ``ENTRY_SEPARATOR`` gives them back (the separator's "}" ends one, the rest
    starts the next). One call per script call instead of a bytes object per record,
    an exact-size copy of each and a join: cheaper per record, by how much in
    bench/RESULTS.md (issue 14, the audit trail's per-request cost).
    """
    return orjson.dumps([entry_value(entry) for entry in entries])


class AuditTrail(Protocol):
    """Reading a session's trail (writes go through ``AuditObserver``)."""

    @property
    def records_per_session(self) -> int:
        """The most records kept (and returned) per session."""
        ...

    async def trail(self, session_id: str, limit: int) -> list[AuditRecord]:
        """The session's last ``limit`` records (at most ``records_per_session``), oldest
        first. Raises ``StoreUnavailable`` when the trail cannot be read."""
        ...


class AuditSink(Protocol):
    def offer(self, session_id: str, record: AuditEntry) -> None:
        """Take the record (or the event it is made of) or drop and count it; O(1),
        never awaits, never raises."""
        ...


class AuditLog(AuditTrail, AuditSink, Protocol):
    """An audit implementation: readable, writable, with a lifecycle."""

    @property
    def dropped(self) -> int:
        """Records dropped because the queue was full."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None:
        """Write what is queued (bounded in time) and stop; safe to call twice."""
        ...


class AuditObserver:
    """The ``RequestObserver`` that feeds the audit log with requests that have a session."""

    def __init__(self, sink: AuditSink) -> None:
        self._sink = sink

    def observe(self, event: RequestEvent) -> None:
        if event.session_id is None:
            return
        self._sink.offer(event.session_id, raw_record(event))  # the record: when needed

    def __repr__(self) -> str:
        return f"AuditObserver(sink={self._sink!r})"


@dataclass(slots=True)
class _Trail:
    records: deque[AuditEntry]
    expires_at: float  # monotonic


class MemoryAudit:
    """``AuditLog`` in this process: the same per-session bound, sessions bounded and expiring."""

    def __init__(self, config: AuditConfig, pin_ttl_s: float, clock: Clock) -> None:
        self._config = config
        self._ttl_s = pin_ttl_s
        self._clock = clock
        # Every write moves its session to the end with expiry now + ttl, so (constant TTL,
        # monotonic clock) the order is both LRU order and expiry order.
        self._trails: OrderedDict[str, _Trail] = OrderedDict()
        self.dropped = 0  # never incremented: a write here cannot be slow

    @property
    def records_per_session(self) -> int:
        return self._config.records_per_session

    @property
    def sessions(self) -> int:
        self._sweep(self._clock.monotonic())
        return len(self._trails)

    def offer(self, session_id: str, record: AuditEntry) -> None:
        now = self._sweep(self._clock.monotonic())
        trail = self._trails.get(session_id)
        if trail is None:
            trail = _Trail(deque(maxlen=self._config.records_per_session), 0.0)
            self._trails[session_id] = trail
        else:
            self._trails.move_to_end(session_id)
        trail.records.append(record)
        trail.expires_at = now + self._ttl_s
        while len(self._trails) > self._config.memory_max_sessions:
            self._trails.popitem(last=False)

    async def trail(self, session_id: str, limit: int) -> list[AuditRecord]:
        self._sweep(self._clock.monotonic())
        trail = self._trails.get(session_id)
        count = min(limit, self.records_per_session)
        if trail is None or count <= 0:
            return []
        return by_arrival([record_of(entry) for entry in list(trail.records)[-count:]])

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _sweep(self, now: float) -> float:
        trails = self._trails
        while trails:
            first = next(iter(trails.values()))
            if first.expires_at > now:
                break
            trails.popitem(last=False)
        return now

    def __repr__(self) -> str:
        return (
            f"MemoryAudit(sessions={len(self._trails)}, "
            f"records_per_session={self.records_per_session}, "
            f"max_sessions={self._config.memory_max_sessions})"
        )


def by_arrival(records: list[AuditRecord]) -> list[AuditRecord]:
    # Records are written when a request ends, and replicas flush their batches at
    # different moments, so write order is not quite request order; arrival time is.
    records.sort(key=lambda record: record.at)
    return records


class DisabledAudit:
    """``AuditLog`` when ``audit.enabled`` is false: keeps nothing, every trail is empty."""

    def __init__(self, config: AuditConfig) -> None:
        self._config = config
        self.dropped = 0

    @property
    def records_per_session(self) -> int:
        return self._config.records_per_session

    def offer(self, session_id: str, record: AuditEntry) -> None:
        return None

    async def trail(self, session_id: str, limit: int) -> list[AuditRecord]:
        return []

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return "DisabledAudit()"
