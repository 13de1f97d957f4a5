"""Audit records, the observer, and the bounds of the in-memory and queued logs."""

from __future__ import annotations

from dataclasses import asdict, replace

import orjson
import pytest
from redis.asyncio import Redis

from proxy.config.observability import AuditConfig
from proxy.config.store import StoreConfig
from proxy.core.clock import ManualClock
from proxy.core.events import RequestEvent
from proxy.telemetry.audit import AuditObserver, AuditRecord, DisabledAudit, MemoryAudit
from proxy.telemetry.audit_redis import RedisAudit


def _event(session_id: str | None = "s", i: int = 0, **changes: object) -> RequestEvent:
    fields: dict[str, object] = dict(
        at=1_700_000_000.0 + i, request_id=f"r-{i}", trace_id="ab" * 16, session_id=session_id,
        method="POST", path="/v1/chat/completions", status=200, backend_id="b-1",
        region="eu", version_key="prompt=v1", new_pin=False, version_changed=None,
        duration_s=0.0123456, ttfb_s=0.002, error_type=None,
    )
    fields.update(changes)
    return RequestEvent(**fields)  # type: ignore[arg-type]


def _record(i: int) -> AuditRecord:
    return AuditRecord.from_event(_event(i=i))


def _with_at(record: AuditRecord, at: float) -> AuditRecord:
    return replace(record, at=at)


class Sink:
    def __init__(self) -> None:
        self.offers: list[tuple[str, AuditRecord]] = []

    def offer(self, session_id: str, record: AuditRecord) -> None:
        self.offers.append((session_id, record))


def test_record_from_event_and_json_round_trip() -> None:
    record = AuditRecord.from_event(_event(path="/v1/" + "x" * 500, version_changed="a -> b"))
    assert (record.request_id, record.region, record.backend_id) == ("r-0", "eu", "b-1")
    assert record.latency_ms == 12.346
    assert record.ttfb_ms == 2.0
    assert len(record.path) == 200
    assert AuditRecord.from_json(record.to_json()) == record
    for garbage in (b"{", b"[]", b'{"at": 1}', b'{"unknown": 1}', b"null",
                    record.to_json().replace(b'"status":200', b'"status":"200"')):
        assert AuditRecord.from_json(garbage) is None


def test_record_json_is_what_it_always_was() -> None:
    for record in (_record(0), AuditRecord.from_event(_event(
            ttfb_s=None, backend_id=None, region=None, version_key=None, status=503,
            error_type="service_unavailable", version_changed="a -> b", path="/é\n\"x"))):
        assert record.to_json() == orjson.dumps(asdict(record))
    assert _record(0).to_json().startswith(b'{"at":1700000000.0,"request_id":"r-0",')


def test_observer_records_only_requests_with_a_session() -> None:
    sink = Sink()
    observer = AuditObserver(sink)
    observer.observe(_event(session_id=None))
    observer.observe(_event(session_id="alice", i=1))
    assert [(sid, r.request_id) for sid, r in sink.offers] == [("alice", "r-1")]


async def test_memory_audit_keeps_the_last_n_per_session_oldest_first() -> None:
    clock = ManualClock()
    audit = MemoryAudit(AuditConfig(records_per_session=3), 60.0, clock)
    for i in range(5):
        audit.offer("a", _record(i))
    audit.offer("b", _record(9))
    assert [r.request_id for r in await audit.trail("a", 100)] == ["r-2", "r-3", "r-4"]
    assert [r.request_id for r in await audit.trail("a", 2)] == ["r-3", "r-4"]
    assert await audit.trail("a", 0) == []
    assert [r.request_id for r in await audit.trail("b", 100)] == ["r-9"]
    assert await audit.trail("nobody", 100) == []
    # Written out of arrival order (a long stream ends last): read in arrival order.
    audit.offer("c", _with_at(_record(1), 20.0))
    audit.offer("c", _with_at(_record(2), 10.0))
    assert [r.request_id for r in await audit.trail("c", 5)] == ["r-2", "r-1"]


async def test_memory_audit_expires_a_session_ttl_after_its_last_record() -> None:
    clock = ManualClock()
    audit = MemoryAudit(AuditConfig(), 10.0, clock)
    audit.offer("a", _record(0))
    audit.offer("b", _record(1))
    clock.advance(6)
    audit.offer("a", _record(2))  # slides a's expiry, like a request slides the pin
    clock.advance(5)
    assert await audit.trail("b", 10) == []
    assert [r.request_id for r in await audit.trail("a", 10)] == ["r-0", "r-2"]
    assert audit.sessions == 1
    clock.advance(5)
    assert await audit.trail("a", 10) == []
    assert audit.sessions == 0


async def test_memory_audit_bounds_the_number_of_sessions_least_recent_first() -> None:
    audit = MemoryAudit(AuditConfig(memory_max_sessions=2), 60.0, ManualClock())
    audit.offer("a", _record(0))
    audit.offer("b", _record(1))
    audit.offer("a", _record(2))
    audit.offer("c", _record(3))
    assert audit.sessions == 2
    assert await audit.trail("b", 10) == []
    assert len(await audit.trail("a", 10)) == 2
    assert "sessions=2" in repr(audit)


async def test_redis_audit_queue_is_bounded_and_counts_drops_without_waiting() -> None:
    drops: list[tuple[str, int]] = []
    client = Redis(host="127.0.0.1", port=1)  # never reached: nothing is started
    audit = RedisAudit(AuditConfig(queue_size=3), StoreConfig(kind="redis"), client,
                       on_drop=lambda reason, n: drops.append((reason, n)))
    for i in range(5):
        audit.offer("s", _record(i))
    assert (audit.queued, audit.dropped) == (3, 2)
    assert drops == [("queue_full", 1), ("queue_full", 1)]
    assert audit.key("a/b ü") == "pinproxy:audit:a/b ü".encode()
    await audit.close()  # never started: the queued records are counted as lost
    assert audit.write_failures == 3
    assert drops[-1] == ("write_failed", 3)
    audit.offer("s", _record(9))  # closed: dropped, not queued
    assert (audit.queued, audit.dropped) == (0, 3)
    await client.aclose()


@pytest.mark.parametrize("limit", [0, 5])
async def test_disabled_audit_keeps_nothing(limit: int) -> None:
    audit = DisabledAudit(AuditConfig(enabled=False))
    audit.offer("s", _record(0))
    assert await audit.trail("s", limit) == []
