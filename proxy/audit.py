"""The per-session audit trail: which request of a session went where, on which version.

Theory of operation
-------------------
The data plane hands every finished request to its observers (``proxy.events``);
``AuditObserver`` turns those that carry a session id into an ``AuditRecord`` and
offers it to the audit log. Offering is O(1) and never awaits or raises, because it
runs inline on the request path (invariant 4: nothing on the hot path waits on work
that can happen later).

With Redis (``RedisAudit``) an offered record goes into a bounded in-process queue.
A full queue drops the record and counts it (``dropped``, and the
``pinproxy_audit_dropped_total{reason="queue_full"}`` counter): a slow or frozen Redis
costs audit records, never request latency. A background task drains the queue in
batches of ``batch_size`` (or whatever has arrived after ``flush_interval_s``), sending
each batch as one pipeline: per record ``XADD <prefix>audit:<session> MAXLEN ~ N``, then
one ``PEXPIRE`` per session with the pin TTL, so a trail lives exactly as long after
its session's last request as the pin does. A batch that fails is lost and counted
(``reason="write_failed"``) rather than retried, so an outage cannot back the queue up
into memory. ``MAXLEN ~`` lets Redis trim whole stream nodes (cheap), so a stream may
briefly hold more than N entries; reads never return more than N.

In memory (``MemoryAudit``, for the single-process memory pin store) a record is
appended at once to its session's ``deque(maxlen=N)``: that is already O(1) and
bounded, so no queue is needed. Sessions are bounded in number (least recently
written goes first) and expire ``pin_ttl_s`` after their last record, like the pin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Protocol

import orjson
from redis.exceptions import RedisError

from proxy.errors import StoreUnavailable

if TYPE_CHECKING:
    from collections.abc import Callable

    from redis.asyncio import Redis

    from proxy.clock import Clock
    from proxy.config import AuditConfig, StoreConfig
    from proxy.events import RequestEvent

    DropHook = Callable[[str, int], None]  # (reason, how many records)

logger = logging.getLogger(__name__)

_FIELD = b"r"  # the one field of each stream entry: the record as JSON
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
        return cls(
            at=event.at,
            request_id=event.request_id,
            trace_id=event.trace_id,
            method=event.method,
            path=event.path[:_MAX_PATH],
            status=event.status,
            backend_id=event.backend_id,
            region=event.region,
            version_key=event.version_key,
            latency_ms=round(event.duration_s * 1000.0, 3),
            ttfb_ms=None if event.ttfb_s is None else round(event.ttfb_s * 1000.0, 3),
            version_changed=event.version_changed,
            error_type=event.error_type,
        )

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

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
    def offer(self, session_id: str, record: AuditRecord) -> None:
        """Take the record or drop and count it; O(1), never awaits, never raises."""
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
        self._sink.offer(event.session_id, AuditRecord.from_event(event))

    def __repr__(self) -> str:
        return f"AuditObserver(sink={self._sink!r})"


def _ignore_drops(reason: str, count: int) -> None:
    return None


class RedisAudit:
    """``AuditLog`` on Redis streams, written off the hot path through a bounded queue."""

    def __init__(
        self,
        config: AuditConfig,
        store: StoreConfig,
        client: Redis,
        *,
        on_drop: DropHook = _ignore_drops,
    ) -> None:
        self._config = config
        self._store = store
        self._client = client
        self._on_drop = on_drop
        self._key_prefix = f"{store.key_prefix}audit:".encode()
        self._ttl_ms = max(1, round(store.pin_ttl_s * 1000))
        self._op_timeout_s = store.op_timeout_ms / 1000
        self._queue: deque[tuple[str, AuditRecord]] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._failing = False
        self.dropped = 0
        self.write_failures = 0  # records lost in batches Redis did not take
        self.written = 0

    @property
    def records_per_session(self) -> int:
        return self._config.records_per_session

    @property
    def queued(self) -> int:
        return len(self._queue)

    def key(self, session_id: str) -> bytes:
        """The Redis stream holding the session's trail (binary-safe, like pin keys)."""
        return self._key_prefix + session_id.encode("utf-8", "surrogatepass")

    def offer(self, session_id: str, record: AuditRecord) -> None:
        if self._closed or len(self._queue) >= self._config.queue_size:
            self.dropped += 1
            self._on_drop("queue_full", 1)
            return
        self._queue.append((session_id, record))
        if len(self._queue) >= self._config.batch_size:
            self._wake.set()

    async def start(self) -> None:
        if self._task is None and not self._closed:
            self._task = asyncio.create_task(self._write_forever(), name="audit-writer")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            # The writer empties the queue before it exits; bounded, so a dead Redis
            # cannot hold shutdown up for longer than a few operation timeouts.
            _, pending = await asyncio.wait([task], timeout=1.0 + 4 * self._op_timeout_s)
            if pending:
                task.cancel()
                await asyncio.wait([task], timeout=1.0)
        if self._queue:
            self._lost("write_failed", len(self._queue))
            logger.warning("audit: %d queued records not written at shutdown", len(self._queue))
            self._queue.clear()

    async def flush(self) -> None:
        """Write everything queued now (used by tests and shutdown)."""
        while self._queue:
            await self._write_batch()

    async def trail(self, session_id: str, limit: int) -> list[AuditRecord]:
        count = min(limit, self.records_per_session)
        if count <= 0:
            return []
        try:
            async with asyncio.timeout(self._op_timeout_s):
                entries = await self._client.xrevrange(self.key(session_id), count=count)
        except (RedisError, OSError) as exc:  # OSError covers asyncio's TimeoutError
            # The exception text is left out: it could carry connection details.
            raise StoreUnavailable(
                f"audit trail read failed at {self._store.masked_url()}: {type(exc).__name__}",
                code="audit_unavailable",
            ) from exc
        records = []
        for _entry_id, fields in reversed(entries or []):
            raw = fields.get(_FIELD) if fields else None
            record = AuditRecord.from_json(raw) if isinstance(raw, bytes | str) else None
            if record is not None:
                records.append(record)
        return _by_arrival(records)

    async def _write_forever(self) -> None:
        while True:
            if len(self._queue) < self._config.batch_size and not self._closed:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._config.flush_interval_s):
                        await self._wake.wait()
            self._wake.clear()
            try:
                await self._write_batch()
            except Exception:
                # The writer must outlive any bug in one batch, or the audit stops for good.
                logger.exception("audit: batch write failed unexpectedly")
            if self._closed and not self._queue:
                return

    async def _write_batch(self) -> None:
        size = min(len(self._queue), self._config.batch_size)
        if size == 0:
            return
        batch = [self._queue.popleft() for _ in range(size)]
        try:
            async with asyncio.timeout(self._op_timeout_s):
                await self._send(batch)
        except (RedisError, OSError) as exc:
            self._lost("write_failed", size)
            if not self._failing:
                logger.warning(
                    "audit: writes to %s failing (%s); records are dropped and counted",
                    self._store.masked_url(), type(exc).__name__,
                )
            self._failing = True
            return
        if self._failing:
            logger.info("audit: writes to %s work again", self._store.masked_url())
        self._failing = False
        self.written += size

    async def _send(self, batch: list[tuple[str, AuditRecord]]) -> None:
        maxlen = self._config.records_per_session
        keys: dict[bytes, None] = {}
        async with self._client.pipeline(transaction=False) as pipe:
            for session_id, record in batch:
                key = self.key(session_id)
                keys[key] = None
                pipe.xadd(key, {_FIELD: record.to_json()}, maxlen=maxlen, approximate=True)
            for key in keys:
                pipe.pexpire(key, self._ttl_ms)
            await pipe.execute()

    def _lost(self, reason: str, count: int) -> None:
        if reason == "write_failed":
            self.write_failures += count
        self._on_drop(reason, count)

    def __repr__(self) -> str:
        return (
            f"RedisAudit(prefix={self._store.key_prefix!r}, queued={len(self._queue)}, "
            f"written={self.written}, dropped={self.dropped}, "
            f"write_failures={self.write_failures}, closed={self._closed})"
        )


@dataclass(slots=True)
class _Trail:
    records: deque[AuditRecord]
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

    def offer(self, session_id: str, record: AuditRecord) -> None:
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
        return _by_arrival(list(trail.records)[-count:])

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


def _by_arrival(records: list[AuditRecord]) -> list[AuditRecord]:
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

    def offer(self, session_id: str, record: AuditRecord) -> None:
        return None

    async def trail(self, session_id: str, limit: int) -> list[AuditRecord]:
        return []

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return "DisabledAudit()"
