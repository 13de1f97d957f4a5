"""Two pinproxy processes under pinned traffic while their Redis fails (issue 10).

Each fault is applied to a real ``redis-server`` while the two replicas answer a
steady stream of continuing conversations, each session first pinned through one of
them. What is asserted is what clients received: no session is ever answered by two
versions, no request waits longer than the store budget, every session is answered
again soon after the store is back, nothing was pinned afresh or switched (counters),
and the replicas logged the outage as warnings, never a traceback.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp

from tests.fixtures.proxy import ProxyProcess, free_port

if TYPE_CHECKING:
    from collections.abc import Callable

    from proxy.sim import SimPop
    from tests.fixtures.redis_server import RedisServer
    from tests.fixtures.sim import StartPop

FIRST = {"model": "sim", "messages": [{"role": "user", "content": "hello"}]}
LATER = {"model": "sim", "messages": [
    {"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"},
    {"role": "user", "content": "and then?"},
]}  # fmt: skip
SESSIONS = 30
OP_TIMEOUT_MS = 300
PIN_WAIT_MS = 500
# The longest any request may take: a store call, the pin wait, and scheduling slack.
BUDGET_S = (OP_TIMEOUT_MS + PIN_WAIT_MS) / 1000 + 1.0


def store_toml(url: str, **extra: str) -> str:
    """The ``[store]`` settings every replica of these tests uses, plus ``extra``."""
    lines = [f'url = "{url}"', *(f"{key} = {value}" for key, value in extra.items())]
    return "\n".join(lines)


def _toml(pops: list[SimPop], store: str, admin_port: int, admitted: str) -> str:
    backends = "\n".join(
        f'[[backends]]\nid = "{p.state.backend_id}"\nregion = "{p.state.region}"\nurl = "{p.url}"\n'
        for p in pops
    )
    return f"""
[listen]
host = "127.0.0.1"
[store]
kind = "redis"
{store}
op_timeout_ms = {OP_TIMEOUT_MS}
touch_interval_s = 0.2
local_cache_ttl_s = 0.3
[routing]
pin_wait_ms = {PIN_WAIT_MS}
retry_after_s = 1
[discovery]
interval_s = 0.2
[versions]
admitted_for_new_sessions = ["{admitted}"]
[log]
level = "warning"
[admin]
port = {admin_port}
{backends}
"""


@dataclass
class Replica:
    process: ProxyProcess
    admin_port: int

    async def metrics(self, http: aiohttp.ClientSession) -> dict[str, float]:
        async with http.get(f"http://127.0.0.1:{self.admin_port}/metrics") as resp:
            text = await resp.text()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out


@dataclass
class Answers:
    """Everything the clients received, per session."""

    versions: dict[str, set[str]] = field(default_factory=dict)
    statuses: Counter[str] = field(default_factory=Counter)
    slowest_s: float = 0.0
    last_ok: dict[str, float] = field(default_factory=dict)

    def mixed(self) -> dict[str, set[str]]:
        return {s: v for s, v in self.versions.items() if len(v) > 1}


async def ask(
    http: aiohttp.ClientSession, replica: Replica, session: str, body: dict[str, Any],
    answers: Answers,
) -> int:
    started = time.monotonic()
    async with http.post(
        f"{replica.process.url}/v1/chat/completions", json=body,
        headers={"X-Session-ID": session},
    ) as resp:
        payload = await resp.json()
        status = resp.status
        version = resp.headers.get("X-Prompt-Version")
    answers.slowest_s = max(answers.slowest_s, time.monotonic() - started)
    if status == 200:
        assert version is not None
        answers.versions.setdefault(session, set()).add(version)
        answers.last_ok[session] = time.monotonic()
        answers.statuses["200"] += 1
    else:
        answers.statuses[f"{status} {payload['error']['type']}"] += 1
    return status


async def start_fleet(
    start_pop: StartPop, proxy_processes: Callable[..., ProxyProcess], store: str,
    http: aiohttp.ClientSession,
) -> tuple[list[Replica], list[str], Answers]:
    # Each replica pins new sessions to its own version, so a session pinned afresh by
    # the other replica would certainly show a second version.
    pops = [await start_pop("a-1", "r1", "v1"), await start_pop("b-1", "r2", "v2")]
    replicas = []
    for admitted in ("v1", "v2"):
        admin_port = free_port()
        process = proxy_processes(_toml(pops, store, admin_port, admitted))
        replicas.append(Replica(process, admin_port))
    for replica in replicas:
        await replica.process.wait_listening()
    answers = Answers()
    for replica in replicas:
        deadline = time.monotonic() + 10
        while await ask(http, replica, "warm-up", FIRST, Answers()) != 200:
            assert time.monotonic() < deadline, replica.process.log()
            await asyncio.sleep(0.1)
    sessions = [f"s{n}" for n in range(SESSIONS)]
    # Each session is pinned through one replica and known only to it.
    for n, session in enumerate(sessions):
        assert await ask(http, replicas[n % 2], session, FIRST, answers) == 200
    assert {v for vs in answers.versions.values() for v in vs} == {"v1", "v2"}
    return replicas, sessions, answers


async def traffic(
    http: aiohttp.ClientSession, replicas: list[Replica], sessions: list[str],
    answers: Answers, stop: asyncio.Event,
) -> None:
    """Every session continues its conversation, alternately on both replicas."""
    turn = 0
    while not stop.is_set():
        turn += 1
        await asyncio.gather(*(
            ask(http, replicas[(n + turn) % 2], session, LATER, answers)
            for n, session in enumerate(sessions)
        ))  # fmt: skip


async def all_answered_since(
    http: aiohttp.ClientSession, replicas: list[Replica], sessions: list[str],
    answers: Answers, since: float, within_s: float,
) -> float:
    """Seconds until every session was answered 200 on both replicas after ``since``."""
    deadline = since + within_s
    pending = {(s, n) for s in sessions for n in range(2)}
    while pending:
        assert time.monotonic() < deadline, f"not answered again: {sorted(pending)[:5]}"
        results = await asyncio.gather(*(
            ask(http, replicas[n], s, LATER, answers) for s, n in pending
        ))  # fmt: skip
        pending = {key for key, status in zip(pending, results, strict=True) if status != 200}
    return time.monotonic() - since


async def check_replicas(http: aiohttp.ClientSession, replicas: list[Replica]) -> None:
    for replica in replicas:
        values = await replica.metrics(http)
        switched = {k: v for k, v in values.items()
                    if k.startswith("pinproxy_session_version_switches_total") and v}
        assert switched == {}
        conflicts = [v for k, v in values.items() if k.startswith("pinproxy_pin_conflicts_total")]
        assert sum(conflicts) == 0
        assert values.get('pinproxy_lost_pins_total{action="mark"}', 0) == 0
        log = replica.process.log(tail=None)
        assert "Traceback" not in log, log
        assert not re.search(r"\bERROR\b", log), log


async def run_fault(
    http: aiohttp.ClientSession, replicas: list[Replica], sessions: list[str],
    answers: Answers, fault: Callable[[], Any], recover: Callable[[], Any],
    outage_s: float,
) -> float:
    stop = asyncio.Event()
    load = asyncio.create_task(traffic(http, replicas, sessions, answers, stop))
    await asyncio.sleep(0.3)  # traffic running before the fault (not synchronisation)
    await asyncio.to_thread(fault)  # traffic goes on meanwhile (a failover takes seconds)
    await asyncio.sleep(outage_s)  # the outage's length is what is under test
    await asyncio.to_thread(recover)
    back = time.monotonic()
    stop.set()
    await load
    return await all_answered_since(http, replicas, sessions, answers, back, within_s=5.0)


async def test_a_redis_restarted_empty_under_traffic_changes_no_session_version(
    start_pop: StartPop, proxy_processes: Callable[..., ProxyProcess],
    private_redis: RedisServer, http: aiohttp.ClientSession,
) -> None:
    replicas, sessions, answers = await start_fleet(
        start_pop, proxy_processes, store_toml(private_redis.url), http
    )
    recovery_s = await run_fault(
        http, replicas, sessions, answers, private_redis.stop, private_redis.start, 1.0
    )
    assert answers.mixed() == {}
    assert answers.slowest_s < BUDGET_S, answers
    assert recovery_s < 5.0
    # Cached sessions were answered all along; the rest were refused, never guessed.
    assert set(answers.statuses) <= {"200", "503 pin_store_unavailable", "503 pin_lost"}, answers
    await check_replicas(http, replicas)
    for replica in replicas:
        log = replica.process.log(tail=None)
        assert log.count("pin invalidation subscription lost") == 1, log
        assert log.count("the pin store lost data") == 1, log
        # Each background writer says once that it is failing, however long it lasts.
        warnings = [line for line in log.splitlines() if " WARNING " in line]
        assert len(warnings) <= 10, "\n".join(warnings)


async def test_a_redis_paused_longer_than_the_subscription_timeout_changes_no_session_version(
    start_pop: StartPop, proxy_processes: Callable[..., ProxyProcess],
    private_redis: RedisServer, http: aiohttp.ClientSession,
) -> None:
    replicas, sessions, answers = await start_fleet(
        start_pop, proxy_processes, store_toml(private_redis.url), http
    )
    # An idle subscription is pinged after 5 s and given up 1 s later.
    recovery_s = await run_fault(
        http, replicas, sessions, answers, private_redis.pause, private_redis.resume, 6.5
    )
    assert answers.mixed() == {}
    assert answers.slowest_s < BUDGET_S, answers
    assert recovery_s < 5.0
    assert set(answers.statuses) <= {"200", "503 pin_store_unavailable",
                                     "503 proxy_overloaded"}, answers
    await check_replicas(http, replicas)
    for replica in replicas:
        log = replica.process.log(tail=None)
        assert "the pin store lost data" not in log  # paused, not emptied: nothing lost


async def test_a_flushall_under_traffic_changes_no_session_version(
    start_pop: StartPop, proxy_processes: Callable[..., ProxyProcess],
    private_redis: RedisServer, http: aiohttp.ClientSession,
) -> None:
    replicas, sessions, answers = await start_fleet(
        start_pop, proxy_processes, store_toml(private_redis.url), http
    )
    recovery_s = await run_fault(
        http, replicas, sessions, answers, private_redis.flushall, lambda: None, 1.0
    )  # longer than the cache TTL: every copy is re-read from the emptied store
    assert answers.mixed() == {}
    assert recovery_s < 5.0
    assert set(answers.statuses) <= {"200", "503 pin_lost"}, answers
    await check_replicas(http, replicas)
    for replica in replicas:
        assert replica.process.log(tail=None).count("the pin store lost data") == 1
