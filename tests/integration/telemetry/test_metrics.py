"""/metrics over real sockets: exact samples after traffic through two prompt versions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from proxy.core.models import VersionBundle
from tests.fixtures.proxy import RunningProxy, StartProxy
from tests.fixtures.redis_server import RedisServer
from tests.fixtures.sim import StartPop

CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hello there"}]}
JSON_MODE = {"response_format": {"type": "json_object"}}
STREAM_USAGE = {"stream": True, "stream_options": {"include_usage": True}}

Samples = dict[str, dict[frozenset[tuple[str, str]], float]]


def parse_samples(text: str) -> Samples:
    """{sample name: {frozenset(labels): value}} of a Prometheus text exposition."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return out


def series(samples: Samples, name: str, keep: Callable[[dict[str, str]], bool] | None = None
           ) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of ``name`` as {sorted label pairs: value}, for exact comparison."""
    found = {tuple(sorted(labels)): value for labels, value in samples.get(name, {}).items()}
    if keep is not None:
        found = {k: v for k, v in found.items() if keep(dict(k))}
    return found


def L(**labels: str) -> tuple[tuple[str, str], ...]:
    """A label set, sorted the way ``series`` keys are."""
    return tuple(sorted(labels.items()))


async def scrape(http: aiohttp.ClientSession, admin_url: str, **headers: str) -> Samples:
    async with http.get(f"{admin_url}/metrics", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/plain")
        return parse_samples(await resp.text())


async def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def ask(http: aiohttp.ClientSession, proxy: RunningProxy, session: str | None,
              **extra: object) -> tuple[int, dict[str, int] | None, str]:
    """(status, usage the client saw, prompt version served)."""
    headers = {"X-Session-ID": session} if session else {}
    async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT | extra,
                         headers=headers) as resp:
        raw = await resp.read()
        prompt = resp.headers.get("X-Prompt-Version", "")
        if resp.status != 200:
            return resp.status, None, prompt
    if extra.get("stream"):
        usage = None
        for line in raw.split(b"\n"):
            if line.startswith(b"data: {") and b'"usage":{' in line:
                usage = orjson.loads(line[6:])["usage"]
        return 200, usage, prompt
    return 200, orjson.loads(raw)["usage"], prompt


async def test_exact_samples_after_traffic_through_two_versions(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    east = await start_pop("us-east-1", "us-east", "v47", completion_tokens=5)
    south = await start_pop("ap-south-1", "ap-south", "v46", completion_tokens=3,
                            json_valid=False)
    proxy = await start_proxy([east, south], routing={"pin_wait_ms": 100})
    registry = proxy.registry
    await wait_for(lambda: len(registry.snapshot.serving_keys()) == 2)

    # New sessions go where they may: first only us-east (v47), then only ap-south (v46).
    registry.set_draining("ap-south-1", True)
    seen: list[tuple[int, dict[str, int] | None, str]] = [
        await ask(http, proxy, "alice"),
        await ask(http, proxy, "alice", **STREAM_USAGE),  # tokens from the final SSE chunk
        await ask(http, proxy, "alice", **JSON_MODE),  # valid JSON
    ]
    registry.set_draining("ap-south-1", False)
    registry.set_draining("us-east-1", True)
    seen += [
        await ask(http, proxy, "bob", **JSON_MODE, **STREAM_USAGE),  # broken JSON, streamed
        await ask(http, proxy, "bob", stream=True),  # no usage asked for: none counted
        await ask(http, proxy, "bob"),
    ]
    assert [(s, p) for s, _, p in seen] == [(200, "v47")] * 3 + [(200, "v46")] * 3
    assert seen[4][1] is None
    tokens = {"v47": [0, 0], "v46": [0, 0]}
    for _, usage, prompt in seen:
        if usage is not None:
            tokens[prompt][0] += usage["prompt_tokens"]
            tokens[prompt][1] += usage["completion_tokens"]
    assert tokens["v47"][1] == 5 * 3
    assert tokens["v46"][1] == 3 * 2

    # bob's version disappears: his next request waits, then gets a 503.
    registry.set_draining("us-east-1", False)
    registry.set_intent("us-east-1", VersionBundle(prompt="v48"))
    south.flip(VersionBundle(prompt="v45"))
    await wait_for(lambda: "prompt=v46" not in registry.snapshot.by_key)
    status, _, _ = await ask(http, proxy, "bob")
    assert status == 503

    samples = await scrape(http, proxy.admin_url)
    assert series(samples, "pinproxy_requests_total") == {
        L(prompt_version="v47", version_key="prompt=v47", region="us-east",
          backend="us-east-1", status_class="2xx"): 3,
        L(prompt_version="v46", version_key="prompt=v46", region="ap-south",
          backend="ap-south-1", status_class="2xx"): 3,
        L(prompt_version="v46", version_key="prompt=v46", region="", backend="",
          status_class="5xx"): 1,
    }
    assert series(samples, "pinproxy_tokens_total") == {
        L(prompt_version="v47", region="us-east", kind="prompt"): tokens["v47"][0],
        L(prompt_version="v47", region="us-east", kind="completion"): 15,
        L(prompt_version="v46", region="ap-south", kind="prompt"): tokens["v46"][0],
        L(prompt_version="v46", region="ap-south", kind="completion"): 6,
    }
    so = L(prompt_version="v47", region="us-east"), L(prompt_version="v46", region="ap-south")
    assert series(samples, "pinproxy_structured_output_requests_total") == {so[0]: 1, so[1]: 1}
    assert series(samples, "pinproxy_structured_output_errors_total") == {so[0]: 0, so[1]: 1}
    assert series(samples, "pinproxy_request_duration_seconds_count") == {
        so[0]: 3, so[1]: 3, L(prompt_version="v46", region=""): 1,
    }
    assert series(samples, "pinproxy_time_to_first_byte_seconds_count") == {so[0]: 3, so[1]: 3}
    inf = series(samples, "pinproxy_request_duration_seconds_bucket",
                 lambda labels: labels["le"] == "+Inf")
    assert inf[L(prompt_version="v47", region="us-east", le="+Inf")] == 3
    assert series(samples, "pinproxy_pins_created_total") == {
        L(version_key="prompt=v47"): 1, L(version_key="prompt=v46"): 1,
    }
    assert series(samples, "pinproxy_version_unavailable_responses_total") == {
        L(version_key="prompt=v46"): 1,
    }
    # Every operation's series exists from the start (app/known_series.py), repin at 0.
    assert series(samples, "pinproxy_pin_store_duration_seconds_count") == {
        L(operation="get"): 7, L(operation="pin_if_absent"): 2, L(operation="repin"): 0,
    }
    assert series(samples, "pinproxy_pin_store_errors_total") == {
        L(operation="get"): 0, L(operation="pin_if_absent"): 0, L(operation="repin"): 0,
    }
    assert series(samples, "pinproxy_backend_health_transitions_total") == {
        L(backend="us-east-1", region="us-east", to="healthy"): 1,
        L(backend="ap-south-1", region="ap-south", to="healthy"): 1,
        L(backend="us-east-1", region="us-east", to="unhealthy"): 0,
        L(backend="ap-south-1", region="ap-south", to="unhealthy"): 0,
    }

    # Gauges: the fleet as it is now (v47 in us-east, v45 in ap-south).
    assert series(samples, "pinproxy_versions_serving") == {(): 2}
    assert series(samples, "pinproxy_region_versions_serving") == {
        L(region="us-east"): 1, L(region="ap-south"): 1,
    }
    assert series(samples, "pinproxy_version_backends") == {
        L(version_key="prompt=v47", prompt_version="v47", region="us-east"): 1,
        L(version_key="prompt=v45", prompt_version="v45", region="ap-south"): 1,
    }
    empty = {"parser": "", "tools": "", "model": ""}
    assert series(samples, "pinproxy_backend_runtime_version_info") == {
        L(backend="us-east-1", region="us-east", version_key="prompt=v47", prompt="v47",
          **empty): 1,
        L(backend="ap-south-1", region="ap-south", version_key="prompt=v45", prompt="v45",
          **empty): 1,
    }
    assert series(samples, "pinproxy_backend_intended_version_info") == {
        L(backend="us-east-1", region="us-east", version_key="prompt=v48", prompt="v48",
          **empty): 1,
    }
    assert series(samples, "pinproxy_backend_version_drift") == {
        L(backend="us-east-1", region="us-east"): 1,
        L(backend="ap-south-1", region="ap-south"): 0,
    }
    # bob is still pinned to v46, which nothing serves any more.
    assert series(samples, "pinproxy_pinned_sessions") == {
        L(version_key="prompt=v47", prompt_version="v47"): 1,
        L(version_key="prompt=v46", prompt_version="v46"): 1,
        L(version_key="prompt=v45", prompt_version="v45"): 0,
    }
    assert series(samples, "pinproxy_backend_healthy") == {
        L(backend="us-east-1", region="us-east"): 1,
        L(backend="ap-south-1", region="ap-south"): 1,
    }
    last_seen = series(samples, "pinproxy_version_last_seen_timestamp_seconds")
    assert sorted(last_seen) == [L(version_key=f"prompt={v}", prompt_version=v)
                                 for v in ("v45", "v46", "v47")]
    assert all(abs(seen - time.time()) < 60 for seen in last_seen.values())


async def test_guard_triggers_and_health_transitions_are_counted(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop("us-east-1", "us-east", "v47")
    proxy = await start_proxy([pop], routing={"pin_wait_ms": 100},
                              discovery={"interval_s": 60})
    await wait_for(lambda: bool(proxy.registry.snapshot.serving_keys()))
    assert (await ask(http, proxy, "carol"))[0] == 200
    # The runtime flips between polls: the stamp gives it away, the answer is withheld.
    pop.flip(VersionBundle(prompt="v48"))
    assert (await ask(http, proxy, "carol"))[0] == 503
    for _ in range(3):
        proxy.registry.report_failure("us-east-1", "refused")
    samples = await scrape(http, proxy.admin_url)
    assert series(samples, "pinproxy_mismatch_guard_triggers_total") == {
        L(backend="us-east-1", pinned_version="prompt=v47", stamped_version="prompt=v48"): 1,
    }
    assert series(samples, "pinproxy_backend_health_transitions_total") == {
        L(backend="us-east-1", region="us-east", to="healthy"): 1,
        L(backend="us-east-1", region="us-east", to="unhealthy"): 1,
    }
    assert series(samples, "pinproxy_backend_healthy") == {
        L(backend="us-east-1", region="us-east"): 0,
    }
    assert series(samples, "pinproxy_versions_serving") == {(): 0}


TOKEN = "metrics-t0ken-0123456789abcdef012345"


async def test_metrics_route_public_path_openapi_and_switch_off(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop], admin={"token": TOKEN, "public_paths": ["/metrics"]})
    # Public: a scraper needs no token, while the rest of the admin API still does.
    samples = await scrape(http, proxy.admin_url)
    assert "pinproxy_versions_serving" in samples
    async with http.get(f"{proxy.admin_url}/admin/openapi.json") as resp:
        assert resp.status == 401
    async with http.get(f"{proxy.admin_url}/admin/openapi.json",
                        headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
        document = await resp.json()
    metrics = document["paths"]["/metrics"]["get"]
    # Both formats it serves (below), and no token: it is a public path.
    assert metrics["responses"]["200"]["content"] == {
        "text/plain": {"schema": {"type": "string"}},
        "application/openmetrics-text": {"schema": {"type": "string"}},
    }
    assert (metrics["security"], "401" in metrics["responses"]) == ([], False)
    # OpenMetrics for scrapers that ask for it.
    async with http.get(f"{proxy.admin_url}/metrics",
                        headers={"Accept": "application/openmetrics-text"}) as resp:
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        assert (await resp.text()).endswith("# EOF\n")

    private = await start_proxy([pop], admin={"token": TOKEN}, metrics={"enabled": False})
    async with http.get(f"{private.admin_url}/metrics") as resp:
        assert resp.status == 401
    async with http.get(f"{private.admin_url}/metrics",
                        headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
        assert resp.status == 404


_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
             "info": ("_info",), "summary": ("_sum", "_count")}


async def exposed_metric_names(http: aiohttp.ClientSession, proxy: RunningProxy) -> set[str]:
    """Every sample name the proxy's /metrics declares, whether or not it has samples yet."""
    async with http.get(f"{proxy.admin_url}/metrics") as resp:
        text = await resp.text()
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ()))
        names.update(sample.name for sample in family.samples)
    return names


async def test_pin_store_failures_are_counted(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession,
    private_redis: RedisServer,
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop], private_redis.url, store={"op_timeout_ms": 200})
    await wait_for(lambda: bool(proxy.registry.snapshot.serving_keys()))
    assert (await ask(http, proxy, "erin"))[0] == 200
    private_redis.pause()
    try:
        status, _, _ = await ask(http, proxy, "frank")
    finally:
        private_redis.resume()
    assert status == 503
    samples = await scrape(http, proxy.admin_url)
    assert series(samples, "pinproxy_pin_store_errors_total") == {
        L(operation="get"): 1, L(operation="pin_if_absent"): 0, L(operation="repin"): 0,
    }
    # erin's first turn was looked up and pinned in one call (proxy/store/redis_lookup.py).
    assert series(samples, "pinproxy_pin_store_duration_seconds_count") == {
        L(operation="get"): 2, L(operation="pin_if_absent"): 0, L(operation="repin"): 0,
    }
    # The same two calls, one answered and one timed out, as the Redis call helper saw them.
    redis_calls = series(samples, "pinproxy_redis_call_duration_seconds_count",
                         lambda s: s["component"] == "store" and s["operation"] == "get")
    assert redis_calls == {L(component="store", operation="get"): 2}
    assert series(samples, "pinproxy_redis_call_errors_total",
                  lambda s: s["component"] == "store" and s["operation"] == "get") == {
        L(component="store", operation="get", kind=kind): int(kind == "timeout")
        for kind in ("timeout", "connection", "response", "other")
    }
    # Every component that speaks to Redis is measured by the helper.
    components = {dict(labels)["component"] for labels in
                  series(samples, "pinproxy_redis_call_duration_seconds_count")}
    assert {"store", "audit", "traffic", "control", "rollout"} <= components
    # A store failure comes before any version is known: the request has no version.
    assert series(samples, "pinproxy_requests_total", lambda s: s["status_class"] == "5xx") == {
        L(prompt_version="", version_key="", region="", backend="", status_class="5xx"): 1,
    }


async def test_a_store_timeout_in_a_saturated_loop_is_overload_not_a_store_failure(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession,
    private_redis: RedisServer,
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop], private_redis.url, store={"op_timeout_ms": 400})
    await wait_for(lambda: bool(proxy.registry.snapshot.serving_keys()))
    assert (await ask(http, proxy, "erin"))[0] == 200
    loop = asyncio.get_running_loop()
    until = loop.time() + 2.0

    def saturate() -> None:
        # The proxy shares this loop: holding it in 250 ms slices is what a core with
        # more work than it can do looks like to every request in flight.
        time.sleep(0.25)
        if loop.time() < until:
            loop.call_soon(saturate)

    private_redis.pause()
    try:
        loop.call_soon(saturate)
        async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT,
                             headers={"X-Session-ID": "frank"}) as resp:
            status, body, retry_after = resp.status, await resp.json(), resp.headers.get(
                "Retry-After")
    finally:
        private_redis.resume()
    assert (status, body["error"]["type"]) == (503, "proxy_overloaded")
    assert retry_after is not None
    assert int(retry_after) >= 1
    samples = await scrape(http, proxy.admin_url)
    # Not blamed on the store: its error counter (and the alert on it) stays quiet.
    assert series(samples, "pinproxy_pin_store_errors_total")[L(operation="get")] == 0
    assert series(samples, "pinproxy_overloaded_responses_total") == {(): 1}
