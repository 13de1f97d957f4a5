"""Which versions users were actually served, per region, over the last minutes or hours.

Theory of operation
-------------------
``TrafficCounter`` is a ``RequestObserver``: for every request a backend answered it
adds one to the count of (region, version key) in the minute the request arrived.
One counter takes production requests, another (``evals=True``, its own keys) the
requests marked as eval traffic (``evals.header``), so the two never mix.
``observe`` is a dict increment and nothing else (invariant 4), so it costs the data
plane nothing measurable.

With one process (memory store) the counts stay here, bucketed by minute and dropped
after ``retention_s``. With replicas sharing Redis, the share of traffic a version
got is a fleet-wide question, so each process also accumulates *pending* increments
and a background task sends them every ``flush_interval_s`` as pipelined HINCRBYs
into one hash per minute (``<prefix>traffic:<minute>``, field ``region|version``)
that expires after ``retention_s``. Reads sum the hashes of the window after flushing
this process's own pending counts, so a process always sees itself exactly and every
other replica with at most ``flush_interval_s`` of lag. An increment whose flush fails
is kept and retried (it is merged back, not lost), as long as its minute is still
inside the retention.

Windows are whole minutes ending with the current (partial) one: "the last 5 min"
is the current minute plus the four before it. ``Window.since`` says exactly where it
starts.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from proxy.core.errors import ProxyError
from proxy.core.outage import OutageLog
from proxy.core.tasks import stop_tasks
from proxy.redis.call import RedisCall, RedisFailure

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from redis.asyncio import Redis

    from proxy.core.clock import Clock
    from proxy.core.events import RequestEvent
    from proxy.redis.metrics import RedisMetrics


logger = logging.getLogger(__name__)

MINUTE_S = 60
DEFAULT_RETENTION_S = 25 * 3600  # a day's window, plus margin for clock skew
DEFAULT_FLUSH_INTERVAL_S = 1.0
# Region ids cannot contain "|" (config and admin validate them), so it splits fields.
_SEP = "|"

Cell = tuple[str, str]  # (region, version key)


class TrafficUnavailable(ProxyError):
    """The shared traffic counts could not be read from Redis."""

    status = 503
    error_type = "traffic_store_unavailable"
    default_code = "traffic_store_unavailable"


def _unavailable(failure: RedisFailure) -> TrafficUnavailable:
    return TrafficUnavailable(f"traffic counts unavailable: {failure.kind}")


@dataclass(frozen=True, slots=True)
class Window:
    """Requests per (region, version key) between ``since`` and ``until`` (wall clock)."""

    since: float
    until: float
    counts: Mapping[Cell, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def by_region(self) -> dict[str, dict[str, int]]:
        """region -> version key -> requests."""
        out: dict[str, dict[str, int]] = {}
        for (region, key), n in self.counts.items():
            out.setdefault(region, {})[key] = n  # cells are unique: no sum needed
        return out

    def by_version(self) -> dict[str, int]:
        """version key -> requests, over every region."""
        out: dict[str, int] = {}
        for (_region, key), n in self.counts.items():
            out[key] = out.get(key, 0) + n
        return out


class _Buckets:
    """Counts per minute per cell; minutes older than the retention are dropped."""

    __slots__ = ("_minutes", "_retention_minutes")

    def __init__(self, retention_minutes: int) -> None:
        self._retention_minutes = retention_minutes
        self._minutes: dict[int, defaultdict[Cell, int]] = {}

    def add(self, minute: int, cell: Cell, n: int = 1) -> None:
        bucket = self._minutes.get(minute)
        if bucket is None:
            bucket = self._minutes[minute] = defaultdict(int)
            self.prune(minute)  # a new minute is rare: the right moment to drop old ones
        bucket[cell] += n

    def prune(self, current_minute: int) -> None:
        oldest = current_minute - self._retention_minutes
        for minute in [m for m in self._minutes if m < oldest]:
            del self._minutes[minute]

    def take(self) -> dict[int, defaultdict[Cell, int]]:
        """Remove and return everything (for a flush)."""
        taken, self._minutes = self._minutes, {}
        return taken

    def sum(self, minutes: Iterable[int]) -> dict[Cell, int]:
        out: dict[Cell, int] = {}
        for minute in minutes:
            for cell, n in self._minutes.get(minute, {}).items():
                out[cell] = out.get(cell, 0) + n
        return out

    def __len__(self) -> int:
        return sum(len(b) for b in self._minutes.values())


class TrafficCounter:
    """Counts served requests per (region, version key) per minute; fleet-wide with Redis."""

    def __init__(
        self,
        clock: Clock,
        *,
        redis: Redis | None = None,
        key_prefix: str = "pinproxy:",
        name: str = "traffic",
        evals: bool = False,
        op_timeout_s: float = 0.5,
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
        retention_s: float = DEFAULT_RETENTION_S,
        redis_metrics: RedisMetrics | None = None,
    ) -> None:
        self._clock = clock
        self._redis = redis
        self._prefix = f"{key_prefix}{name}:"
        self._evals = evals  # counts eval requests only (else production only)
        self._op_timeout_s = op_timeout_s
        self._call = RedisCall(
            op_timeout_s, _unavailable, clock=clock.monotonic, metrics=redis_metrics,
            component=name, operations=("flush", "read"),
        )
        self._flush_interval_s = flush_interval_s
        self._retention_s = retention_s
        retention_minutes = math.ceil(retention_s / MINUTE_S)
        # Memory mode: the counts themselves. Redis mode: increments not yet flushed.
        self._buckets = _Buckets(retention_minutes)
        self._task: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()
        self._closed = False
        self._outage = OutageLog(logger, "traffic count flushes")

    @property
    def shared(self) -> bool:
        """True when counts are shared through Redis with every replica."""
        return self._redis is not None

    @property
    def pending(self) -> int:
        """Cells counted here and not yet flushed to Redis (memory mode: all cells held)."""
        return len(self._buckets)

    def observe(self, event: RequestEvent) -> None:
        """Count one finished request (only ones a backend answered). In-memory, O(1)."""
        if event.backend_id is None or event.region is None or event.version_key is None:
            return
        if event.eval_run != self._evals:
            return
        self._buckets.add(int(event.at // MINUTE_S), (event.region, event.version_key))

    async def start(self) -> None:
        if self._redis is not None and self._task is None:
            self._task = asyncio.create_task(self._flush_forever(), name="traffic-flush")

    async def close(self) -> None:
        """Stop flushing and send what is pending (best effort); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        await stop_tasks([self._task], timeout_s=1.0 + 2 * self._op_timeout_s,
                         what=f"{self._prefix} flushes")  # fmt: skip
        self._task = None
        if self._redis is not None:
            try:
                await self.flush()
            except TrafficUnavailable as exc:
                logger.warning("traffic counts dropped on close: %s", exc.message)

    async def window(self, window_s: float) -> Window:
        """Counts over the last ``window_s`` seconds, rounded up to whole minutes."""
        now = self._clock.time()
        current = int(now // MINUTE_S)
        count = max(1, math.ceil(window_s / MINUTE_S))
        minutes = range(current - count + 1, current + 1)
        since = float(minutes[0] * MINUTE_S)
        if self._redis is None:
            return Window(since, now, self._buckets.sum(minutes))
        await self.flush()
        return Window(since, now, await self._read(minutes))

    async def flush(self) -> None:
        """Send pending increments to Redis; on failure they are kept for the next try."""
        if self._redis is None:
            return
        async with self._flush_lock:
            taken = self._buckets.take()
            if not taken:
                return
            try:
                await self._call("flush", self._send(taken))
            except BaseException:
                # Failed or cancelled mid-send: keep the counts for the next flush. (A
                # timeout after Redis applied them double-counts one batch; losing
                # counts silently would be worse for an eval comparing distributions.)
                for minute, cells in taken.items():
                    for cell, n in cells.items():
                        self._buckets.add(minute, cell, n)
                self._buckets.prune(int(self._clock.time() // MINUTE_S))
                raise

    async def _send(self, taken: Mapping[int, Mapping[Cell, int]]) -> None:
        assert self._redis is not None
        ttl = max(1, round(self._retention_s))
        async with self._redis.pipeline(transaction=False) as pipe:
            for minute, cells in taken.items():
                key = f"{self._prefix}{minute}"
                for (region, version_key), n in cells.items():
                    pipe.hincrby(key, f"{region}{_SEP}{version_key}", n)
                pipe.expire(key, ttl)
            await pipe.execute()

    async def _read(self, minutes: range) -> dict[Cell, int]:
        assert self._redis is not None
        redis = self._redis

        async def fetch() -> list[Any]:
            async with redis.pipeline(transaction=False) as pipe:
                for minute in minutes:
                    pipe.hgetall(f"{self._prefix}{minute}")
                return await pipe.execute()

        out: dict[Cell, int] = {}
        for fields in await self._call("read", fetch()):
            for raw_field, raw_n in fields.items():
                name = raw_field.decode() if isinstance(raw_field, bytes) else str(raw_field)
                region, sep, version_key = name.partition(_SEP)
                try:
                    n = int(raw_n)
                except ValueError:
                    n = 0
                if sep and n > 0:
                    out[(region, version_key)] = out.get((region, version_key), 0) + n
        return out

    async def _flush_forever(self) -> None:
        while not self._closed:
            await asyncio.sleep(self._flush_interval_s)
            try:
                await self.flush()
                self._outage.succeeded()
            except TrafficUnavailable as exc:
                self._outage.failed(f"{exc.message} (counts kept for later)")
            except Exception:
                logger.exception("traffic flush failed unexpectedly")

    def __repr__(self) -> str:
        mode = "redis" if self._redis is not None else "memory"
        return (
            f"TrafficCounter(mode={mode}, cells={len(self._buckets)}, "
            f"retention_s={self._retention_s}, closed={self._closed})"
        )
