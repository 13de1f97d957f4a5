"""The audit log on Redis streams, written off the hot path through a bounded queue.

Theory of operation
-------------------
An offered record goes into a bounded in-process queue.
A full queue drops the record and counts it (``dropped``, and the
``pinproxy_audit_dropped_total{reason="queue_full"}`` counter): a slow or frozen Redis
costs audit records, never request latency. A background task drains the queue in
batches of ``batch_size`` (or whatever has arrived after ``flush_interval_s``), sending
each batch in one round trip: per record ``XADD <prefix>audit:<session> MAXLEN ~ N``,
then one ``PEXPIRE`` per session with the pin TTL, so a trail lives exactly as long
after its session's last request as the pin does. Those commands run in a Lua script,
one call per ``_RECORDS_PER_CALL`` records, all calls in one pipeline: a reply per
command would cost the client more than the rest of the record's work together. A
batch that fails is lost and counted (``reason="write_failed"``) rather than retried,
so an outage cannot back the queue up into memory. ``MAXLEN ~`` lets Redis trim whole
stream nodes (cheap), so a stream may briefly hold more than N entries; reads never
return more than N.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import TYPE_CHECKING

from proxy.core.errors import StoreUnavailable
from proxy.redis.call import RedisCall, RedisFailure
from proxy.telemetry.audit import (
    ENTRY_SEPARATOR,
    AuditRecord,
    by_arrival,
    entries_json,
    entry_json,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from redis.asyncio import Redis

    from proxy.config.observability import AuditConfig
    from proxy.config.store import StoreConfig
    from proxy.redis.metrics import RedisMetrics
    from proxy.telemetry.audit import AuditEntry

    DropHook = Callable[[str, int], None]  # (reason, how many records)

logger = logging.getLogger(__name__)

_FIELD = b"r"  # the one field of each stream entry: the record as JSON
# A script holds Redis while it runs, so pin reads from any replica wait behind an audit
# write for as long as one call takes: 100 records keep that well under a millisecond
# (bench/RESULTS.md, "Numbers behind choices in the code").
_RECORDS_PER_CALL = 100
# KEYS: each record's stream; ARGV: MAXLEN, TTL in ms, the entry's field, then the
# records in the order of KEYS as one argument: a command argument costs redis-py more
# to pack than the script costs Redis to split. The argument is one JSON array made in
# one orjson call (audit.entries_json), split here on audit.ENTRY_SEPARATOR, not a
# bytes object per record joined by newlines (bench/RESULTS.md: issue 14's telemetry
# round, then the audit trail's per-request cost).
_APPEND = """
local maxlen, ttl, field, records = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local streams = {}
local at, last = 2, #records - 1
for _, key in ipairs(KEYS) do
  local stop = string.find(records, 'SEPARATOR', at, true)
  local record
  if stop then
    record = string.sub(records, at, stop)
    at = stop + 2
  else
    record = string.sub(records, at, last)
  end
  redis.call('XADD', key, 'MAXLEN', '~', maxlen, '*', field, record)
  streams[key] = true
end
for key in pairs(streams) do
  redis.call('PEXPIRE', key, ttl)
end
return #KEYS
""".replace("SEPARATOR", ENTRY_SEPARATOR.decode())


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
        redis_metrics: RedisMetrics | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._client = client
        self._on_drop = on_drop
        self._key_prefix = f"{store.key_prefix}audit:".encode()
        # On a cluster the trail shares its session's slot ({session}, like its pin),
        # and a script may only touch one slot: records go as plain XADD + PEXPIRE.
        self._cluster = store.topology == "cluster"
        self._ttl_ms = max(1, round(store.pin_ttl_s * 1000))
        self._op_timeout_s = store.op_timeout_ms / 1000
        masked = store.masked_url()

        def unavailable(failure: RedisFailure) -> StoreUnavailable:
            # The exception's class only: its text could carry connection details.
            return StoreUnavailable(
                f"audit trail {failure.what} failed at {masked}: {failure.kind}",
                code="audit_unavailable",
            )

        self._call = RedisCall(
            self._op_timeout_s, unavailable, metrics=redis_metrics, component="audit",
            operations=("read", "write"),
        )
        self._queue_size, self._batch_size = config.queue_size, config.batch_size
        self._script_args = (
            str(config.records_per_session).encode(), str(self._ttl_ms).encode(), _FIELD)
        self._queue: deque[tuple[str, AuditEntry]] = deque()
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
        raw = session_id.encode("utf-8", "surrogatepass")
        return self._key_prefix + (b"{" + raw + b"}" if self._cluster else raw)

    def offer(self, session_id: str, record: AuditEntry) -> None:
        queue = self._queue
        if self._closed or len(queue) >= self._queue_size:
            self.dropped += 1
            self._on_drop("queue_full", 1)
            return
        queue.append((session_id, record))
        if len(queue) >= self._batch_size:
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
        entries = await self._call("read", self._client.xrevrange(self.key(session_id),
                                                                  count=count))
        records = []
        for _entry_id, fields in reversed(entries or []):
            raw = fields.get(_FIELD) if fields else None
            record = AuditRecord.from_json(raw) if isinstance(raw, bytes | str) else None
            if record is not None:
                records.append(record)
        return by_arrival(records)

    async def _write_forever(self) -> None:
        while True:
            if len(self._queue) < self._batch_size and not self._closed:
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
        size = min(len(self._queue), self._batch_size)
        if size == 0:
            return
        batch = [self._queue.popleft() for _ in range(size)]
        try:
            await self._call("write", self._send(batch))
        except StoreUnavailable as exc:
            self._lost("write_failed", size)
            if not self._failing:
                logger.warning("audit: %s; records are dropped and counted", exc.message)
            self._failing = True
            return
        if self._failing:
            logger.info("audit: writes to %s work again", self._store.masked_url())
        self._failing = False
        self.written += size

    def script_call(self, chunk: Sequence[tuple[str, AuditEntry]]) -> tuple[list[bytes], bytes]:
        """The ``_APPEND`` script's keys and records argument for up to
        ``_RECORDS_PER_CALL`` records: a batch write's cost per record in this process,
        apart from redis-py's packing and the send (bench/micro_observers.py times it)."""
        key = self.key
        return ([key(session_id) for session_id, _ in chunk],
                entries_json([entry for _, entry in chunk]))

    async def _send(self, batch: list[tuple[str, AuditEntry]]) -> None:
        if self._cluster:
            await self._send_plain(batch)
            return
        async with self._client.pipeline(transaction=False) as pipe:
            for start in range(0, len(batch), _RECORDS_PER_CALL):
                keys, records = self.script_call(batch[start:start + _RECORDS_PER_CALL])
                pipe.eval(_APPEND, len(keys), *keys, *self._script_args, records)
            await pipe.execute()

    async def _send_plain(self, batch: list[tuple[str, AuditEntry]]) -> None:
        maxlen = self._config.records_per_session
        async with self._client.pipeline(transaction=False) as pipe:
            for session_id, record in batch:
                key = self.key(session_id)
                pipe.xadd(key, {_FIELD: entry_json(record)}, maxlen=maxlen, approximate=True)
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
