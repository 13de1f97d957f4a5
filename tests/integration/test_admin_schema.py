"""GET /admin/openapi.json tells the truth about the admin API, whoever adds routes.

1. The document lists exactly the routes of ``all_routes()``, and each documented
   operation is really served (no 404 from the router, no 405), while methods it
   does not document are refused.
2. schemathesis generates requests for every operation in the document (valid and
   invalid data) against a live admin listener (real socket, real redis-server):
   with the token, no 5xx and every response matches the documented status codes,
   content types and schemas; without it, every answer is a documented 401 JSON.

Both cover whatever ``all_routes()`` returns when they run, so routes added by other
groups are held to the same contract.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
import hypothesis
import requests
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from proxy.admin.routes import all_routes
from tests.fixtures.proxy import RunningProxy, StartProxy
from tests.fixtures.sim import StartPop
from tests.integration.sessions_helpers import chat, trail_of, wait_routable

TOKEN = "schema-t0ken-0123456789abcdef0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
METHODS = ("GET", "PUT", "POST", "DELETE", "PATCH")
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance]
EXAMPLES = 12  # per operation and pass; the whole run stays well under a minute
# Generated framing headers test aiohttp's HTTP parser, not the API: it refuses e.g.
# Content-Length with Transfer-Encoding with a plain-text 400 before any handler runs.
FRAMING = frozenset({"transfer-encoding", "content-length", "connection", "host", "expect",
                     "upgrade", "te", "trailer", "keep-alive"})


async def _live_proxy(start_pop: StartPop, start_proxy: StartProxy, redis_url: str,
                      http: aiohttp.ClientSession) -> RunningProxy:
    pops = [await start_pop("pop-a", "r-a", "v1"), await start_pop("pop-b", "r-b", "v2")]
    proxy = await start_proxy(pops, redis_url, admin={"token": TOKEN})
    await wait_routable(proxy, "pop-a", "pop-b")
    assert (await chat(http, proxy.url, "alice"))[0] == 200
    await trail_of(http, proxy.admin_url, "alice", 1, token=TOKEN)
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
        for method in METHODS:
            body = {} if "requestBody" in ops.get(method.lower(), {}) else None
            async with http.request(method, url, headers=AUTH, json=body) as resp:
                json = resp.content_type == "application/json"
                answer = await resp.json() if json else await resp.text()
                routed = not (resp.status == 404 and answer["error"]["code"] == "404")
                if method.lower() in ops:
                    assert routed, (method, path, resp.status, answer)
                    assert resp.status != 405, (method, path, answer)
                    assert str(resp.status) in ops[method.lower()]["responses"], (
                        method, path, resp.status, answer)
                else:
                    assert resp.status == 405, (method, path, resp.status, answer)


def _run(operation: Any, base_url: str, statuses: list[int], *, mode: GenerationMode,
         headers: dict[str, str], authorized: bool,
         path_parameters: dict[str, str] | None = None) -> str | None:
    """One hypothesis run over ``operation``; the first failure as text, or None."""

    @hypothesis.settings(max_examples=EXAMPLES, deadline=None, database=None,
                         phases=[Phase.explicit, Phase.generate],
                         suppress_health_check=list(HealthCheck))
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode,
                                                 path_parameters=path_parameters))
    def run(case: Any) -> None:
        for name in list(case.headers or {}):
            if name.lower() in FRAMING:
                del case.headers[name]
        response = case.call(base_url=base_url, headers=headers, timeout=10)
        statuses.append(response.status_code)
        case.validate_response(response, checks=CHECKS, headers=headers)
        if not authorized:
            assert response.status_code == 401, response.text
            # schemathesis' Response: lowercase header names, list values.
            assert response.headers["content-type"][0].startswith("application/json")
            assert response.json()["error"]["type"] == "authentication_error"
            assert TOKEN not in response.text

    try:
        run()
    except Exception as exc:  # collected: one operation's failure must not hide another's
        return f"{operation.label} [{mode.value}, token={authorized}]: {exc}"
    return None


def _fuzz(document: dict[str, Any], base_url: str) -> tuple[list[str], int, list[int]]:
    schema = schemathesis.openapi.from_dict(document)
    failures: list[str] = []
    statuses: list[int] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        known = {"session_id": "alice"}
        params = {p.name for p in operation.path_parameters}
        passes: list[dict[str, Any]] = [
            {"mode": GenerationMode.POSITIVE, "headers": AUTH, "authorized": True},
            {"mode": GenerationMode.NEGATIVE, "headers": AUTH, "authorized": True},
            {"mode": GenerationMode.POSITIVE, "headers": {}, "authorized": False},
            {"mode": GenerationMode.POSITIVE, "headers": {"Authorization": "Bearer nope"},
             "authorized": False},
        ]
        if params and params <= known.keys():
            # Ids that exist, so success answers get checked against their schema too.
            passes.append({"mode": GenerationMode.POSITIVE, "headers": AUTH,
                           "authorized": True,
                           "path_parameters": {name: known[name] for name in params}})
        for kwargs in passes:
            failure = _run(operation, base_url, statuses, **kwargs)
            if failure is not None:
                failures.append(failure)
    # A plain request, so a broken listener cannot pass as "no failures".
    assert requests.get(f"{base_url}/admin/openapi.json", headers=AUTH, timeout=10).ok
    return failures, len(operations), statuses


async def test_schemathesis_finds_no_5xx_and_no_answer_that_contradicts_the_document(
    start_pop: StartPop, start_proxy: StartProxy, redis_url: str, http: aiohttp.ClientSession,
) -> None:
    proxy = await _live_proxy(start_pop, start_proxy, redis_url, http)
    document = await _document(http, proxy)
    # In a thread: the admin listener under test runs in this event loop.
    failures, operations, statuses = await asyncio.to_thread(_fuzz, document, proxy.admin_url)
    assert not failures, "\n\n".join(failures)
    assert operations == len(all_routes())
    # Not vacuous: many requests, refused and accepted ones among them.
    assert len(statuses) >= 4 * operations
    assert {200, 400, 401} <= set(statuses)
