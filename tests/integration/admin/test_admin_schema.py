"""GET /admin/openapi.json tells the truth about the admin API, whoever adds routes.

1. The document lists exactly the routes of ``all_routes()``; each documented
   operation is really served, and every other method on a documented path is a 405
   JSON error whose ``Allow`` header names exactly the documented methods.
2. ``schemathesis run --checks all`` (the CLI, in its own process) with a valid token,
   against a live admin listener of a fresh proxy (real socket, real redis-server, real
   simulated POPs, sessions pinned through the data plane): all its phases (coverage,
   fuzzing, stateful) and all its checks, derandomized (the same cases every run, no
   example database, no cache) and with a bounded number of examples per operation.
   Any check failure fails the test, and so does a run that tested fewer operations
   than ``all_routes()`` or that never got a request accepted by some operation.

Both cover whatever ``all_routes()`` returns when they run, so routes added by other
groups are held to the same contract.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from typing import TYPE_CHECKING, Any

import aiohttp

from proxy.admin.routes import all_routes
from tests.fixtures.proxy import RunningProxy, StartProxy, loopback_resolve
from tests.fixtures.sim import StartPop
from tests.integration.admin.sessions_helpers import chat, trail_of, wait_routable

if TYPE_CHECKING:
    from pathlib import Path

TOKEN = "schema-test-token-0123456789abcdef"  # >= 32 bytes
AUTH = {"Authorization": f"Bearer {TOKEN}"}
METHODS = ("GET", "HEAD", "PUT", "POST", "DELETE", "PATCH", "OPTIONS", "TRACE")
EXAMPLES = 20  # fuzzing examples per operation; the whole run stays well under a minute
# Ids that exist when the run starts, so requests reach the handlers' success paths;
# schemathesis draws them for half the cases and generates the other half.
SESSIONS = ("alice", "team/alice", "ünï")
BACKENDS = ("pop-a", "pop-b")
# Destructive operations get resources of their own, so deleting them cannot turn
# later cases of other operations into 404s.
DOOMED_SESSION = "doomed-session"
DOOMED_BACKEND = "pop-doomed"
DESTRUCTIVE = (  # operation, its path parameter, the resource it may destroy
    ("DELETE /admin/sessions/{session_id}/pin", "session_id", DOOMED_SESSION),
    ("DELETE /admin/backends/{backend_id}", "backend_id", DOOMED_BACKEND),
)


async def _live_proxy(start_pop: StartPop, start_proxy: StartProxy, redis_url: str,
                      http: aiohttp.ClientSession) -> RunningProxy:
    pops = [await start_pop("pop-a", "r-a", "v1"), await start_pop("pop-b", "r-b", "v2"),
            await start_pop(DOOMED_BACKEND, "r-a", "v1")]
    # Backends the fuzz adds may only be on loopback (their /version is polled), and
    # their names are resolved without DNS: the fuzz sends nothing off this host.
    proxy = await start_proxy(pops, redis_url, admin_resolve=loopback_resolve, admin={
        "token": TOKEN, "backend_networks": ["127.0.0.0/8", "::1/128"]})
    await wait_routable(proxy, "pop-a", "pop-b", DOOMED_BACKEND)
    for session in (*SESSIONS, DOOMED_SESSION):
        assert (await chat(http, proxy.url, session))[0] == 200
        await trail_of(http, proxy.admin_url, session, 1, token=TOKEN)
    return proxy


async def _document(http: aiohttp.ClientSession, proxy: RunningProxy) -> dict[str, Any]:
    async with http.get(f"{proxy.admin_url}/admin/openapi.json", headers=AUTH) as resp:
        assert resp.status == 200
        document: dict[str, Any] = await resp.json()
    return document


def _oas_path(path: str) -> str:
    return re.sub(r"\{([^}:]+)(:[^}]*)?\}", r"{\1}", path)


async def test_the_document_lists_exactly_the_routes_that_are_served(
    start_pop: StartPop, start_proxy: StartProxy, redis_url: str, http: aiohttp.ClientSession,
) -> None:
    proxy = await _live_proxy(start_pop, start_proxy, redis_url, http)
    document = await _document(http, proxy)
    assert document["openapi"] == "3.1.0"
    documented = {(method.upper(), path) for path, ops in document["paths"].items()
                  for method in ops}
    table = {(route.method, _oas_path(route.path)) for route in all_routes()}
    assert documented == table
    assert ("GET", "/admin/sessions/{session_id}") in documented
    ids = [op["operationId"] for ops in document["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))

    for path, ops in document["paths"].items():
        url = proxy.admin_url + re.sub(r"\{[^}]+\}", "no-such-id", path)
        allowed = sorted(method.upper() for method in ops)
        for method in METHODS:
            body: dict[str, Any] | None = (
                {} if "requestBody" in ops.get(method.lower(), {}) else None)
            async with http.request(method, url, headers=AUTH, json=body) as resp:
                json_body = resp.content_type == "application/json" and method != "HEAD"
                answer: Any = await resp.json() if json_body else None
                if method.lower() in ops:
                    assert resp.status != 405, (method, path, answer)
                    routed = resp.status != 404 or answer["error"]["code"] != "not_found"
                    assert routed, (method, path, resp.status, answer)
                    assert str(resp.status) in ops[method.lower()]["responses"], (
                        method, path, resp.status, answer)
                else:
                    assert resp.status == 405, (method, path, resp.status, answer)
                    assert sorted(resp.headers["Allow"].split(",")) == allowed, (method, path)
                    if answer is not None:
                        assert answer["error"]["code"] == "method_not_allowed"
                        assert all(m in answer["error"]["message"] for m in allowed)


def _config(report: Path) -> str:
    """schemathesis.toml for one deterministic, bounded run that keeps no state."""
    sessions = json.dumps(list(SESSIONS))
    backends = json.dumps(list(BACKENDS))
    # A dictionary, not a fixed value: a fixed one would also replace the ids that
    # stateful links carry (delete what POST /admin/backends just created).
    operations = "".join(
        f'[dictionaries.doomed-{name}]\nvalues = ["{target}"]\n\n'
        f'[[operations]]\ninclude-name = "{label}"\n'
        f'parameters = {{ "path.{name}" = {{ dictionary = "doomed-{name}", '
        'probability = 0.5 } }\n\n'
        for label, name, target in DESTRUCTIVE)
    return f"""
workers = 1
headers = {{ Authorization = "Bearer {TOKEN}" }}
request-timeout = 10

[cache]
enabled = false

[generation]
max-examples = {EXAMPLES}
deterministic = true
database = "none"

[reports.json]
path = "{report}"

[dictionaries.sessions]
values = {sessions}

[dictionaries.backends]
values = {backends}

[dictionaries.targets]
values = ["v1", "v2", "prompt=v1", "prompt=v2"]

[parameters]
"path.session_id" = {{ dictionary = "sessions", probability = 0.5 }}
"path.backend_id" = {{ dictionary = "backends", probability = 0.5 }}
"path.target" = {{ dictionary = "targets", probability = 0.5 }}

{operations}"""


async def _schemathesis(document_url: str, workdir: Path) -> tuple[int, str, dict[str, Any]]:
    """``schemathesis run --checks all`` in its own process: exit code, output, JSON report."""
    report = workdir / "report.json"
    config = workdir / "schemathesis.toml"
    config.write_text(_config(report))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config),
        "run", "--checks", "all", "--no-color", document_url,
        cwd=workdir, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), timeout=100)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    text = output.decode(errors="replace")
    assert report.exists(), text
    return proc.returncode, text, json.loads(report.read_text())


async def test_schemathesis_with_every_check_finds_nothing_the_document_contradicts(
    start_pop: StartPop, start_proxy: StartProxy, redis_url: str, http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    proxy = await _live_proxy(start_pop, start_proxy, redis_url, http)
    code, output, report = await _schemathesis(f"{proxy.admin_url}/admin/openapi.json", tmp_path)
    tail = output[-20_000:]
    assert (code, report["failures"], report["errors"]) == (0, [], []), tail
    assert report["complete"], tail
    assert report["stop_reason"] == "completed", tail
    # All but GET /admin/openapi.json: schemathesis does not test the document it loaded.
    operations = len(all_routes()) - 1
    assert report["operations"] == {**report["operations"], "total": operations,
                                    "selected": operations, "tested": operations,
                                    "errored": 0, "skipped": 0}, tail
    phases = {name: phase["status"] for name, phase in report["phases"].items()}
    assert {phases["coverage"], phases["fuzzing"], phases["stateful"]} == {"success"}, phases
    # Schemathesis understood every schema, and could reach every handler with data.
    warnings = report["warnings"]
    for kind in ("unsupported_regex", "validation_mismatch", "unused_openapi_auth",
                 "missing_auth", "low_valid_rate"):
        assert warnings.get(kind, []) == [], (kind, warnings[kind])
    # Only the deletes see mostly 404s: their resource is gone after the first success;
    # and the repin of a session, whose pin a stateful link to the unpin may remove
    # (links carry real ids from earlier answers, which the doomed dictionary does not
    # replace); the 404 checks still ran on every one of its cases.
    destructive = {label for label, _, _ in DESTRUCTIVE} | {"PUT /admin/sessions/{session_id}/pin"}
    assert set(warnings["missing_test_data"]) <= destructive, warnings["missing_test_data"]
    # Not vacuous: many cases, and every operation accepted some of them.
    assert report["test_cases"]["generated"] >= 20 * operations, report["test_cases"]
    accepted = {label: sum(phase["accepted"] for phase in rates.values())
                for label, rates in report["valid_rates"].items()}
    assert len(accepted) == operations, accepted
    assert min(accepted.values()) > 0, accepted
