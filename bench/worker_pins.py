"""Check for ``throughput``'s two-worker target: pins stay consistent across workers.

Four static POPs answer, two as v46 and two as v47; pinproxy with ``--workers 2`` is
put in front of them, pins in the run's Redis (with two POPs per version, a new
session's power-of-two-choices pick lands on either version, so the workers' picks for
one session can differ). Every request goes on a connection of its own, so the
kernel's SO_REUSEPORT hash spreads each session's requests over both workers; the first
request of every session is sent at once (each worker picks a version for a session it
does not know yet: the pin race), then ``turns - 1`` more each. The check passes when
no session was answered by two versions, every session that was answered has exactly
one pin in Redis, and two worker processes did work (their CPU time grew); refused
requests are counted apart.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import aiohttp

from bench.common import port_of, run_async, wait_ready
from bench.procs import (
    cpu_seconds,
    free_port,
    nginx_static_pop_conf,
    parse_overrides,
    process_tree,
    proxy_toml,
    start_nginx,
    start_pinproxy,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from bench.common import RunContext

PATH = "/v1/chat/completions"
BODY = b'{"model":"sim","messages":[{"role":"user","content":"hi"}]}'


def check_pins_across_workers(
    ctx: RunContext, redis_url: str, *, sessions: int = 400, turns: int = 4,
    concurrency: int = 128, proxy_set: Sequence[str] = (),
) -> dict[str, Any]:
    """Run the check; its verdict and counts (see the module docstring). ``proxy_set``:
    the run's pinproxy overrides (``section.key=value``)."""
    layout = ctx.layout
    backends = []
    for backend_id, prompt in (("pop-v46a", "v46"), ("pop-v46b", "v46"),
                               ("pop-v47a", "v47"), ("pop-v47b", "v47")):
        port = free_port()
        conf = nginx_static_pop_conf(ctx.work, backend_id, port, backend_id, prompt)
        start_nginx(ctx.procs, backend_id, conf, port, layout.load_cpus, layout)
        # A region per version: within one region, new sessions get its one current
        # version (atomic cutover), which would leave nothing to race for.
        backends.append((backend_id, f"bench-{prompt}", f"http://127.0.0.1:{port}"))
    port = free_port()
    prefix = f"bench-pins-{port}:"
    toml = proxy_toml(port=port, backends=backends, redis_url=redis_url, key_prefix=prefix,
                      sections=parse_overrides(proxy_set))
    proxy = start_pinproxy(ctx.procs, "pinproxy-pins", toml, port, cpus=layout.all_cpus,
                           layout=layout, workers=2)
    url = f"http://127.0.0.1:{port}"
    run_async(wait_ready("127.0.0.1", port_of(url)))
    workers = [pid for pid in process_tree(proxy.pid) if pid != proxy.pid]
    before = {pid: cpu_seconds([pid]) for pid in workers}
    seen, errors = run_async(_ask_all(url, sessions, turns, concurrency))
    worker_cpu = {pid: round(cpu_seconds([pid]) - before[pid], 3) for pid in workers}
    # The supervisor's children: the two workers, and helpers that serve no requests.
    busy = sorted((cpu for cpu in worker_cpu.values() if cpu > 0.05), reverse=True)
    pins = run_async(_pins(redis_url, prefix))
    ctx.procs.stop(proxy)
    split = sorted(s for s, versions in seen.items() if len(versions - {"error"}) > 1)
    failed = sorted(s for s, versions in seen.items() if "error" in versions)
    answered = {s for s, versions in seen.items() if versions - {"error"}}
    by_version: dict[str, int] = {}
    for versions in seen.values():
        for version in versions:
            by_version[version] = by_version.get(version, 0) + 1
    # Errors (e.g. 503 proxy_overloaded on a busy machine) are reported apart: a
    # refused request is answered by no version, so it cannot split a session.
    ok = not split and len(answered) <= pins <= sessions and len(busy) >= 2
    return {
        "sessions": sessions,
        "requests": sessions * turns,
        "sessions_answered_by_two_versions": len(split),
        "sessions_with_an_error": len(failed),
        "errors": errors[:5],
        "sessions_by_version": by_version,
        "pins_in_redis": pins,
        "worker_cpu_s": busy,
        "consistent": ok,
    }


async def _ask_all(url: str, sessions: int, turns: int, concurrency: int
                   ) -> tuple[dict[str, set[str]], list[str]]:
    seen: dict[str, set[str]] = {f"pins-{i}": set() for i in range(sessions)}
    errors: list[str] = []
    limit = asyncio.Semaphore(concurrency)
    # A connection per request: each lands on whichever worker the kernel picks.
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def ask(session: str) -> None:
            async with limit, http.post(
                url + PATH, data=BODY,
                headers={"X-Session-ID": session, "Content-Type": "application/json"},
            ) as resp:
                body = await resp.read()
                if resp.status == 200:
                    seen[session].add(resp.headers.get("X-Prompt-Version", "none"))
                else:
                    seen[session].add("error")
                    errors.append(f"{resp.status} {body[:160].decode(errors='replace')}")

        for _ in range(turns):  # all first requests at once (the race), then the rest
            await asyncio.gather(*(ask(session) for session in seen))
    return seen, errors


async def _pins(redis_url: str, prefix: str) -> int:
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_url)
    try:
        return sum([1 async for _ in client.scan_iter(match=f"{prefix}pin:*", count=1000)])
    finally:
        await client.aclose()
