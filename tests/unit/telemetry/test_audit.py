"""Audit records, the observer, and the bounds of the in-memory and queued logs."""

from __future__ import annotations

from dataclasses import asdict, replace

import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from redis.asyncio import Redis

from proxy.config.observability import AuditConfig
from proxy.config.store import StoreConfig
from proxy.core.clock import ManualClock
from proxy.core.events import RequestEvent
from proxy.telemetry.audit import (
    ENTRY_SEPARATOR,
    AuditEntry,
    AuditObserver,
    AuditRecord,
    DisabledAudit,
    MemoryAudit,
    entries_json,
    entry_json,
    raw_record,
    record_of,
)
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

    def offer(self, session_id: str, record: AuditEntry) -> None:
        self.offers.append((session_id, record_of(record)))


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


_text = st.text(max_size=300)
_maybe_text = st.none() | _text
_seconds = st.floats(min_value=0, max_value=1e6, allow_nan=False)


@given(
    at=st.floats(min_value=0, max_value=4e9, allow_nan=False), request_id=_text,
    method=_text, path=_text, status=st.integers(100, 599), backend_id=_maybe_text,
    region=_maybe_text, version_key=_maybe_text, duration_s=_seconds,
    ttfb_s=st.none() | _seconds, version_changed=_maybe_text, error_type=_maybe_text,
)
@example(at=1.5, request_id="r", method="GET", path="/" + "é" * 300, status=200,
         backend_id=None, region=None, version_key=None, duration_s=0.0012345,
         ttfb_s=0.0000005, version_changed="a -> b", error_type=None)
def test_the_lazy_record_is_the_record_made_at_once(
    at: float, request_id: str, method: str, path: str, status: int, backend_id: str | None,
    region: str | None, version_key: str | None, duration_s: float, ttfb_s: float | None,
    version_changed: str | None, error_type: str | None,
) -> None:
    # What the observer queues (a tuple) must come out as the record, and as its JSON,
    # that building the record from the event at once would have given.
    event = _event(at=at, request_id=request_id, method=method, path=path, status=status,
                   backend_id=backend_id, region=region, version_key=version_key,
                   duration_s=duration_s, ttfb_s=ttfb_s, version_changed=version_changed,
                   error_type=error_type)
    eager = AuditRecord(
        at=event.at, request_id=event.request_id, trace_id=event.trace_id,
        method=event.method, path=event.path[:200], status=event.status,
        backend_id=event.backend_id, region=event.region, version_key=event.version_key,
        latency_ms=round(event.duration_s * 1000.0, 3),
        ttfb_ms=None if event.ttfb_s is None else round(event.ttfb_s * 1000.0, 3),
        version_changed=event.version_changed, error_type=event.error_type,
    )
    raw = raw_record(event)
    assert record_of(raw) == eager == AuditRecord.from_event(event)
    assert entry_json(raw) == eager.to_json() == orjson.dumps(asdict(eager))
    assert entry_json(eager) == eager.to_json()
    assert record_of(eager) is eager


# Strings that look like the array's record boundary, or could hide one in escapes.
_tricky = st.text(alphabet=st.sampled_from(['}', ',', '{', '"', '\\', 'a', 't', ':', '\n', 'é']),
                  max_size=40) | st.sampled_from(['},{"at":', '"},{"at":"', '\\"},{"at":',
                                                 '},{\\"at\\":'])
_maybe_tricky = st.none() | _tricky


@given(st.lists(st.tuples(
    st.floats(min_value=0, max_value=4e9, allow_nan=False), _tricky, _tricky, _tricky,
    _tricky, st.integers(100, 599), _maybe_tricky, _maybe_tricky, _maybe_tricky, _seconds,
    st.none() | _seconds, _maybe_tricky, _maybe_tricky, st.booleans(),
), min_size=1, max_size=12))
@example([(1.0, '},{"at":', '"},{"at":"', "GET", '\\"},{"at":', 200, None, None, None, 0.5,
           None, "},{", "x\ny", False),
          (2.0, "r", "t", "POST", "/", 503, "b", "eu", "v", 0.25, 0.125, None, None, True)])
def test_the_batch_array_splits_into_each_records_json(
    rows: list[tuple[float, str, str, str, str, int, str | None, str | None, str | None,
                     float, float | None, str | None, str | None, bool]],
) -> None:
    # The writer sends a script call's records as one JSON array that the script splits
    # on ENTRY_SEPARATOR (proxy/telemetry/audit_redis.py): whatever the fields hold, the
    # pieces must be exactly each record's own JSON, for queued tuples and records alike.
    entries: list[AuditEntry] = []
    for *fields, as_record in rows:
        raw = tuple(fields)
        entries.append(record_of(raw) if as_record else raw)  # type: ignore[arg-type]
    array = entries_json(entries)
    assert array.startswith(b"[")
    assert array.endswith(b"]")
    pieces = array[1:-1].split(ENTRY_SEPARATOR)
    rebuilt = [pieces[0] + b"}"] if len(pieces) > 1 else [pieces[0]]
    rebuilt += [b'{"at":' + piece + b"}" for piece in pieces[1:-1]]
    if len(pieces) > 1:
        rebuilt.append(b'{"at":' + pieces[-1])
    assert rebuilt == [entry_json(entry) for entry in entries]
    assert [AuditRecord.from_json(piece) for piece in rebuilt] == [
        record_of(entry) for entry in entries]


class RawSink:
    def __init__(self) -> None:
        self.entries: list[AuditEntry] = []

    def offer(self, session_id: str, record: AuditEntry) -> None:
        self.entries.append(record)


def test_the_queued_entry_holds_no_request_body_and_no_long_path() -> None:
    # A queue of events would hold every request body until written: 10,000 of them;
    # the memory log keeps 100 entries a session for 10,000 sessions.
    sink = RawSink()
    AuditObserver(sink).observe(_event(request_body=b"x" * 100_000, path="/" + "p" * 8000))
    [entry] = sink.entries
    assert isinstance(entry, tuple)
    assert not any(isinstance(field, bytes) for field in entry)
    assert max(len(field) for field in entry if isinstance(field, str)) <= 200  # the path


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
