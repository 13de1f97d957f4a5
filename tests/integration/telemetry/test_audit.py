"""The audit trail: per session, in order, bounded, expiring with the pin, never in the way.

Real POPs, real sockets, and a real redis-server (the shared one, or a private one for
the outage test); each test runs against Redis and against the in-memory store where
both apply.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
import redis.asyncio as aioredis

from proxy.config.observability import AuditConfig
from proxy.config.store import StoreConfig
from proxy.telemetry.audit import AuditRecord
from proxy.telemetry.audit_redis import RedisAudit
from tests.fixtures.proxy import StartProxy
from tests.fixtures.redis_server import RedisServer
from tests.fixtures.sim import StartPop
from tests.integration.admin.sessions_helpers import chat, get_session, trail_of, wait_routable

STORES = ["memory", "redis"]


def _traceparent(i: int) -> str:
    return f"00-{i:032x}-{i:016x}-01"


@pytest.mark.parametrize("store", STORES)
async def test_trail_of_a_session_served_by_two_regions_of_the_same_version(
    store: str, start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession,
    redis_url: str,
) -> None:
    east = await start_pop("us-east-1", "us-east", "v47", parser="json-v2")
    # eu-west runs the same version but is not up yet.
    west = await start_pop("eu-west-1", "eu-west", "v47", parser="json-v2",
                           version_endpoint_ok=False)
    proxy = await start_proxy([east, west], redis_url if store == "redis" else None,
                              audit={"flush_interval_s": 0.05})
    await wait_routable(proxy, "us-east-1")
    started = time.time()
    for i in (1, 2):
        status, headers = await chat(http, proxy.url, "alice", request_id=f"req-{i}",
                                     traceparent=_traceparent(i))
        assert (status, headers["X-Served-Region"]) == (200, "us-east")

    # us-east goes away, eu-west comes up: the session moves region, not version.
    east.state.version_endpoint_ok = False
    west.state.version_endpoint_ok = True
    await wait_routable(proxy, "eu-west-1")
    for _ in range(200):
        if not proxy.registry.snapshot.by_id["us-east-1"].healthy:
            break
        await asyncio.sleep(0.05)
    assert not proxy.registry.snapshot.by_id["us-east-1"].healthy
    for i in (3, 4):
        status, headers = await chat(http, proxy.url, "alice", request_id=f"req-{i}",
                                     traceparent=_traceparent(i))
        assert (status, headers["X-Served-Region"]) == (200, "eu-west")

    document = await trail_of(http, proxy.admin_url, "alice", 4)
    trail = document["trail"]
    key = "prompt=v47,parser=json-v2"
    assert [(r["request_id"], r["region"], r["backend_id"]) for r in trail] == [
        ("req-1", "us-east", "us-east-1"),
        ("req-2", "us-east", "us-east-1"),
        ("req-3", "eu-west", "eu-west-1"),
        ("req-4", "eu-west", "eu-west-1"),
    ]
    assert [r["trace_id"] for r in trail] == [f"{i:032x}" for i in (1, 2, 3, 4)]
    assert {r["version_key"] for r in trail} == {key}
    assert {(r["status"], r["method"], r["path"]) for r in trail} == {
        (200, "POST", "/v1/chat/completions")}
    assert all(r["latency_ms"] > 0 and r["ttfb_ms"] is not None for r in trail)
    assert all(r["latency_ms"] >= r["ttfb_ms"] for r in trail)
    times = [r["at"] for r in trail]
    assert times == sorted(times)
    assert started - 1 <= times[0] <= times[-1] <= time.time()
    # The pin still says where the session started.
    assert (document["pin"]["version_key"], document["pin"]["region"]) == (key, "us-east")
    # Requests without a session id are routed but never audited.
    assert (await chat(http, proxy.url, None))[0] == 200


@pytest.mark.parametrize("store", STORES)
async def test_trail_keeps_the_last_n_records(
    store: str, start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession,
    redis_url: str,
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop], redis_url if store == "redis" else None,
                              audit={"records_per_session": 3, "flush_interval_s": 0.05})
    await wait_routable(proxy, "pop-1")
    for i in range(7):
        assert (await chat(http, proxy.url, "bob", request_id=f"b-{i}"))[0] == 200
    await trail_of(http, proxy.admin_url, "bob", 3)

    async def last_is_b6() -> list[str]:
        _, document = await get_session(http, proxy.admin_url, "bob", limit=10_000)
        return [r["request_id"] for r in document["trail"]]

    deadline = time.monotonic() + 10
    while (ids := await last_is_b6())[-1:] != ["b-6"]:
        assert time.monotonic() < deadline, ids
        await asyncio.sleep(0.05)
    assert ids == ["b-4", "b-5", "b-6"]


async def test_redis_streams_are_trimmed_and_expire_with_the_pin_ttl(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    store = StoreConfig(kind="redis", url=redis_url, key_prefix="trim:", pin_ttl_s=30)
    audit = RedisAudit(AuditConfig(records_per_session=5, batch_size=64), store, client)
    await audit.start()
    try:
        for i in range(250):
            audit.offer("s1", _record(i))
        audit.offer("s/2 ü", _record(1000))
        await audit.close()  # writes everything queued before it returns
        assert (audit.written, audit.dropped, audit.write_failures) == (251, 0, 0)
        # MAXLEN ~ trims whole stream nodes: bounded well below what was written.
        assert await client.xlen(b"trim:audit:s1") <= 5 + 100
        ttl = await client.pttl(b"trim:audit:s1")
        assert 25_000 < ttl <= 30_000
        reader = RedisAudit(AuditConfig(records_per_session=5), store, client)
        trail = await reader.trail("s1", 100)
        assert [r.request_id for r in trail] == [f"r-{i}" for i in range(245, 250)]
        assert trail[0] == _record(245)
        assert [r.request_id for r in await reader.trail("s1", 2)] == ["r-248", "r-249"]
        assert [r.request_id for r in await reader.trail("s/2 ü", 5)] == ["r-1000"]
        assert await reader.trail("nobody", 5) == []
        # An entry that is not a record (someone else's write) is skipped, not fatal.
        await client.xadd(b"trim:audit:s1", {b"r": b"{garbage"})
        await client.xadd(b"trim:audit:s1", {b"x": b"1"})
        assert [r.request_id for r in await reader.trail("s1", 5)] == [
            "r-247", "r-248", "r-249"]
    finally:
        await audit.close()
        await client.aclose()


async def test_a_batch_of_many_sessions_keeps_each_sessions_order_and_ttl(
    redis_url: str,
) -> None:
    client = aioredis.from_url(redis_url)
    store = StoreConfig(kind="redis", url=redis_url, key_prefix="many:", pin_ttl_s=30)
    audit = RedisAudit(AuditConfig(records_per_session=50, batch_size=450), store, client)
    try:
        for i in range(900):  # two batches, each written in several script calls
            audit.offer(f"s{i % 7}", _record(i))
        await audit.flush()
        assert (audit.written, audit.write_failures) == (900, 0)
        for s in range(7):
            expected = [f"r-{i}" for i in range(900) if i % 7 == s][-50:]
            assert [r.request_id for r in await audit.trail(f"s{s}", 50)] == expected
            assert 25_000 < await client.pttl(audit.key(f"s{s}")) <= 30_000
    finally:
        await client.delete(*(audit.key(f"s{s}") for s in range(7)))
        await audit.close()
        await client.aclose()


async def test_records_of_one_script_call_come_back_whole_newlines_and_all(
    redis_url: str,
) -> None:
    # A call's records travel as one JSON array that the script splits between records:
    # a record whose fields hold newlines, quotes, backslashes or the boundary itself
    # (escaped in its JSON) must not be cut in two.
    from dataclasses import replace

    from proxy.core.events import RequestEvent
    from proxy.telemetry.audit import raw_record

    client = aioredis.from_url(redis_url)
    store = StoreConfig(kind="redis", url=redis_url, key_prefix="newline:", pin_ttl_s=30)
    audit = RedisAudit(AuditConfig(records_per_session=10), store, client)
    odd = replace(_record(1), path="/a\nb\r\n\u2028ü", error_type="x\ny")
    boundary = replace(_record(3), at=1_700_000_002.5, request_id='},{"at":',
                       path='/"},{"at":1,"x":"', version_changed='\\"},{"at":', error_type="}")
    event = RequestEvent(
        at=1_700_000_003.0, request_id="r-ev", trace_id="ab" * 16, session_id="s", method="POST",
        path="/p\n", status=200, backend_id="b", region="eu", version_key="prompt=v1",
        new_pin=False, version_changed="a -> b", duration_s=0.0015, ttfb_s=None,
        error_type=None,
    )
    try:
        audit.offer("s", _record(0))
        audit.offer("s", odd)
        audit.offer("s", raw_record(event))
        audit.offer("s", _record(2))
        audit.offer("s", boundary)
        await audit.flush()
        assert await audit.trail("s", 10) == [
            _record(0), odd, _record(2), boundary, AuditRecord.from_event(event)]
    finally:
        await client.delete(audit.key("s"))
        await audit.close()
        await client.aclose()


async def test_a_batch_redis_refuses_is_counted_and_the_next_one_is_written(
    redis_url: str,
) -> None:
    client = aioredis.from_url(redis_url)
    store = StoreConfig(kind="redis", url=redis_url, key_prefix="refused:")
    drops: list[tuple[str, int]] = []
    audit = RedisAudit(AuditConfig(batch_size=10), store, client,
                       on_drop=lambda reason, n: drops.append((reason, n)))
    try:
        await client.set(b"refused:audit:taken", b"not a stream")
        for i in range(3):
            audit.offer("taken", _record(i))
        await audit.flush()  # WRONGTYPE from inside the script: the batch is lost
        assert (audit.written, audit.write_failures, drops) == (0, 3, [("write_failed", 3)])
        audit.offer("fine", _record(7))
        await audit.flush()
        assert audit.written == 1
        assert [r.request_id for r in await audit.trail("fine", 5)] == ["r-7"]
    finally:
        await client.delete(b"refused:audit:taken", b"refused:audit:fine")
        await audit.close()
        await client.aclose()


def _record(i: int) -> AuditRecord:
    return AuditRecord(at=1_700_000_000.0 + i, request_id=f"r-{i}", trace_id=f"{i:032x}",
                       method="POST", path="/v1/chat/completions", status=200,
                       backend_id="b", region="r", version_key="prompt=v1",
                       latency_ms=1.5, ttfb_ms=1.0)


@pytest.mark.parametrize("store", STORES)
async def test_trail_expires_with_the_pin(
    store: str, start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession,
    redis_url: str,
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop], redis_url if store == "redis" else None,
                              store={"pin_ttl_s": 1.0, "local_cache_ttl_s": 0.1,
                                     "touch_interval_s": 30},
                              audit={"flush_interval_s": 0.05})
    await wait_routable(proxy, "pop-1")
    assert (await chat(http, proxy.url, "carol"))[0] == 200
    document = await trail_of(http, proxy.admin_url, "carol", 1)
    assert document["pin"] is not None
    if store == "redis":
        client = aioredis.from_url(redis_url)
        try:
            assert 0 < await client.pttl(b"pinproxy:audit:carol") <= 1000
        finally:
            await client.aclose()
    # Not read meanwhile (a read slides the pin's TTL like a request does).
    await asyncio.sleep(1.6)
    status, document = await get_session(http, proxy.admin_url, "carol")
    assert status == 404, document


async def test_a_full_queue_drops_and_counts_and_never_slows_a_request(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession,
    private_redis: RedisServer,
) -> None:
    pop = await start_pop()
    # A long op timeout: a request that waited for an audit write would take 5 s.
    proxy = await start_proxy([pop], private_redis.url, store={"op_timeout_ms": 5000},
                              audit={"queue_size": 1, "batch_size": 1,
                                     "flush_interval_s": 0.02})
    await wait_routable(proxy, "pop-1")
    audit = proxy.services.audit
    assert isinstance(audit, RedisAudit)
    assert (await chat(http, proxy.url, "dan", request_id="before"))[0] == 200
    await trail_of(http, proxy.admin_url, "dan", 1)  # pinned and cached, audit written
    assert audit.dropped == 0

    private_redis.pause()
    try:
        durations = []
        for i in range(15):
            started = time.monotonic()
            status, _ = await chat(http, proxy.url, "dan", request_id=f"during-{i}")
            durations.append(time.monotonic() - started)
            assert status == 200
        # The writer is stuck on one batch and the queue holds one record: the rest drop.
        assert audit.dropped >= 12
        assert proxy.metric("pinproxy_audit_dropped_total", reason="queue_full") == audit.dropped
        assert max(durations) < 1.0, durations
    finally:
        private_redis.resume()
    document = await trail_of(http, proxy.admin_url, "dan", 2)
    ids = [r["request_id"] for r in document["trail"]]
    assert ids[0] == "before"
    assert len(ids) <= 1 + 15 - audit.dropped
