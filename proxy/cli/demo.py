"""``pinproxy demo``: the incident from background.md on one machine, and the fix.

Four simulated POPs mid-rollout (us-east and eu-west on v47, ap-south and
ap-northeast still on v46, each with its own latency) behind pinproxy with the
in-memory pin store. ``config/demo.toml`` holds the same settings as
``demo_settings()`` (a test keeps them equal).
"""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass

import aiohttp
import orjson

from proxy.config.settings import Settings, settings_from_mapping
from proxy.runtime.instance import running_proxy
from proxy.sim import PopState, SimPop
from proxy.telemetry.logs import configure_logging


@dataclass(frozen=True, slots=True)
class DemoPop:
    id: str
    region: str
    prompt: str
    parser: str
    ttfb_ms: float
    port: int


DEMO_POPS = (
    DemoPop("us-east-1", "us-east", "v47", "json-v2", 30.0, 18101),
    DemoPop("eu-west-1", "eu-west", "v47", "json-v2", 60.0, 18102),
    DemoPop("ap-south-1", "ap-south", "v46", "json-v1", 10.0, 18103),
    DemoPop("ap-northeast-1", "ap-northeast", "v46", "json-v1", 45.0, 18104),
)
DEMO_MODEL = "sim-large"


def demo_settings(
    port: int = 8080, pop_urls: dict[str, str] | None = None, admin_port: int = 9901
) -> Settings:
    urls = pop_urls or {p.id: f"http://127.0.0.1:{p.port}" for p in DEMO_POPS}
    return settings_from_mapping(
        {
            "listen": {"host": "127.0.0.1", "port": port},
            # Loopback, no token: `pinproxy session alice` (whose default --admin this is)
            # works against the demo as it runs.
            "admin": {"host": "127.0.0.1", "port": admin_port},
            "store": {"kind": "memory"},
            "discovery": {"interval_s": 1.0},
            "log": {"level": "warning", "format": "text"},
            "backends": [{"id": p.id, "region": p.region, "url": urls[p.id]} for p in DEMO_POPS],
        }
    )


def run_demo(*, port: int, check: bool) -> int:
    return asyncio.run(_demo(port, check))


async def _demo(port: int, check: bool) -> int:
    pops = [
        SimPop(
            PopState.create(
                p.id,
                p.region,
                p.prompt,
                parser=p.parser,
                model=DEMO_MODEL,
                ttfb_ms=p.ttfb_ms,
                tokens_per_second=20.0,
                completion_tokens=6,
            )
        )
        for p in DEMO_POPS
    ]
    # --check runs unattended (CI, a first try): ephemeral ports cannot collide.
    for spec, pop in zip(DEMO_POPS, pops, strict=True):
        await pop.start(port=0 if check else spec.port)
    settings = demo_settings(
        0 if check else port, {p.state.backend_id: p.url for p in pops}, 0 if check else 9901
    )
    if check:
        # An unattended report: its own lines only, not the request log between them.
        settings = settings.model_copy(
            update={"log": settings.log.model_copy(update={"request_log": False})}
        )
    # Interactively, the human-readable request lines show which version served each request.
    configure_logging(settings.log)
    try:
        # The admin API too (on an ephemeral port with --check, which cannot collide):
        # `pinproxy session alice` reads from it while the demo runs.
        async with running_proxy(settings) as proxy:
            proxy_url, admin_url = proxy.url, proxy.admin_url or ""
            if check:
                print(f"pinproxy demo --check: {proxy_url}, admin API {admin_url}", flush=True)
                return 0 if await _self_check(proxy_url, admin_url, pops) else 1
            _banner(proxy_url, admin_url, pops)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, stop.set)
            await stop.wait()
            return 0
    finally:
        for pop in pops:
            await pop.stop()


def _banner(proxy_url: str, admin_url: str, pops: list[SimPop]) -> None:
    print("pinproxy demo: a rollout paused half-way, four regions, two prompt versions\n")
    for pop in pops:
        print(
            f"  {pop.state.backend_id:<15} {pop.state.region:<13} prompt "
            f"{pop.state.version.prompt}  ttfb {pop.state.ttfb_ms:>4.0f} ms  {pop.url}"
        )
    body = '{"model":"sim","messages":[{"role":"user","content":"hello"}]}'
    fastest_other = pops[2].url
    print(
        f"""
pinproxy: {proxy_url}

# 1. a session's first request pins it to the version that served it (see X-Prompt-Version):
curl -si {proxy_url}/v1/chat/completions -H 'X-Session-ID: alice' \\
     -H 'Content-Type: application/json' -d '{body}'

# 2. make a POP fastest; alice still only goes to POPs on her version:
curl -s -X POST {fastest_other}/_sim/control -d '{{"ttfb_ms": 1}}'

# 3. stream tokens (SSE) through the proxy:
curl -sN {proxy_url}/v1/chat/completions -H 'X-Session-ID: alice' \\
     -d '{{"model":"sim","stream":true,"messages":[{{"role":"user","content":"hi"}}]}}'

# 4. flip a POP's runtime version without telling anyone; the proxy notices from its stamps:
curl -s -X POST {pops[0].url}/_sim/control \\
     -d '{{"version": {{"prompt": "v46", "parser": "json-v1"}}}}'

# 5. alice's pin and every request she made (the admin API is at {admin_url}):
pinproxy session alice --admin {admin_url}

Ctrl-C stops the demo.""",
        flush=True,
    )


async def _session_trail(
    http: aiohttp.ClientSession, admin_url: str, session: str, expected: int
) -> list[dict[str, object]]:
    """The session's audit trail from the admin API, once it holds ``expected`` records
    (it is written off the request path, so it lags by up to audit.flush_interval_s)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5.0
    trail: list[dict[str, object]] = []
    while loop.time() < deadline:
        async with http.get(f"{admin_url}/admin/sessions/{session}") as resp:
            if resp.status == 200:
                trail = (await resp.json())["trail"]
                if len(trail) >= expected:
                    break
        await asyncio.sleep(0.05)
    return trail


async def _self_check(proxy_url: str, admin_url: str, pops: list[SimPop]) -> bool:
    """Play the incident: latencies shift under a live session; its version must not."""
    body = {"model": "sim", "messages": [{"role": "user", "content": "hello"}]}
    seen: list[tuple[str, str, str]] = []
    async with aiohttp.ClientSession() as http:

        async def ask(session: str | None) -> tuple[str, str, str]:
            headers = {"X-Session-ID": session} if session else {}
            async with http.post(
                f"{proxy_url}/v1/chat/completions", json=body, headers=headers
            ) as resp:
                await resp.read()
                return (
                    str(resp.status),
                    resp.headers.get("X-Prompt-Version", "-"),
                    resp.headers.get("X-Served-By", "-"),
                )

        first = await ask("alice")
        pinned = first[1]
        print(f"\nalice's first request: status {first[0]}, prompt {pinned}, served by {first[2]}")
        # Now make the POPs on the *other* version the fastest by far.
        for pop in pops:
            pop.state.ttfb_ms = 150.0 if pop.state.version.prompt == pinned else 1.0
        print(f"latencies shifted: POPs not on {pinned} are now fastest")
        for _ in range(8):
            seen.append(await ask("alice"))
        for status, prompt, served_by in seen:
            print(f"  alice -> status {status}  prompt {prompt}  served by {served_by}")
        bob = await ask("bob")
        print(f"a new session, bob, goes where it is fast: prompt {bob[1]} via {bob[2]}")
        async with http.post(
            f"{proxy_url}/v1/chat/completions",
            json=body | {"stream": True},
            headers={"X-Session-ID": "alice"},
        ) as resp:
            events = [line async for line in resp.content if line.startswith(b"data:")]
            print(
                f"alice streams: {len(events)} SSE events, prompt "
                f"{resp.headers.get('X-Prompt-Version')}"
            )
            streamed = resp.headers.get("X-Prompt-Version")
        # What `pinproxy session alice` shows: every request alice made, by version.
        trail = await _session_trail(http, admin_url, "alice", len(seen) + 2)
        versions = sorted({str(r.get("version_key")) for r in trail})
        print(f"alice's audit trail (admin API): {len(trail)} requests, versions {versions}")
    ok = all(s == "200" and p == pinned for s, p, _ in seen) and streamed == pinned
    on_pin = all(v.split(",")[0] == f"prompt={pinned}" for v in versions)
    ok = ok and len(trail) == len(seen) + 2 and on_pin
    summary = {"pinned": pinned, "requests": len(seen) + 2, "stayed_on_version": ok}
    print("\nresult:", orjson.dumps(summary).decode())
    return ok
