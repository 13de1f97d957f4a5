"""``pinproxy session ID``: the pin and the trail as a table, from a live admin API."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import aiohttp
import orjson

from tests.fixtures.proxy import StartProxy, free_port
from tests.fixtures.sim import StartPop
from tests.integration.admin.sessions_helpers import chat, trail_of, wait_routable

ROOT = Path(__file__).resolve().parents[3]
TOKEN = "cli-s3cret-0123456789abcdef0123456789"


async def _pinproxy(*args: str, token: str | None = None) -> tuple[int, str, str]:
    # Asynchronously: the admin API answering it runs in this very event loop.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PINPROXY_")}
    if token is not None:
        env["PINPROXY_ADMIN_TOKEN"] = token
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_session_command_prints_the_pin_and_trail_as_a_table(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pop = await start_pop("us-east-1", "us-east", "v47", parser="json-v2")
    proxy = await start_proxy([pop], admin={"token": TOKEN})
    await wait_routable(proxy, "us-east-1")
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    for i in range(3):
        assert (await chat(http, proxy.url, "team/alice", request_id=f"req-{i}",
                           traceparent=tp))[0] == 200
    await trail_of(http, proxy.admin_url, "team/alice", 3, token=TOKEN)

    code, out, err = await _pinproxy("session", "team/alice", "--admin", proxy.admin_url,
                                     token=TOKEN)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "session    team/alice"
    assert lines[1] == "pinned to  prompt=v47,parser=json-v2  (prompt v47)"
    assert lines[2].startswith("pinned at  20")
    assert lines[2].endswith(" UTC")
    assert lines[3] == "where      us-east-1 (us-east)"
    assert lines[5] == "audit trail: last 3 requests, oldest first (at most 100 kept)"
    header = lines[6].split()
    assert header[:5] == ["TIME", "(UTC)", "REQUEST", "ID", "TRACE"]
    rows = [line.split() for line in lines[7:]]
    assert [row[2] for row in rows] == ["req-0", "req-1", "req-2"]
    for row in rows:
        assert row[3:8] == ["0af7651916cd43dd8448eb211c80319c", "us-east", "us-east-1",
                            "prompt=v47,parser=json-v2", "200"]
        assert row[9] == "ms"
    assert TOKEN not in out + err

    # --limit, --json, and the token from --token instead of the environment.
    code, out, err = await _pinproxy("session", "team/alice", "--admin", proxy.admin_url,
                                     "--limit", "1", "--json", "--token", TOKEN)
    assert code == 0, err
    document = orjson.loads(out)
    assert [r["request_id"] for r in document["trail"]] == ["req-2"]


async def test_session_command_errors_are_one_line_and_never_show_the_token(
    start_pop: StartPop, start_proxy: StartProxy,
) -> None:
    pop = await start_pop()
    proxy = await start_proxy([pop], admin={"token": TOKEN})
    code, out, err = await _pinproxy("session", "nobody", "--admin", proxy.admin_url,
                                     token=TOKEN)
    assert code == 1
    assert "404 not_found_error: no pin and no audit trail" in err
    code, out, err = await _pinproxy("session", "nobody", "--admin", proxy.admin_url,
                                     token="wrong-" + TOKEN)
    assert code == 1
    assert "401 authentication_error" in err
    assert TOKEN not in out + err
    code, out, err = await _pinproxy("session", "x", "--admin", f"http://127.0.0.1:{free_port()}")
    assert code == 1
    assert "cannot reach the admin API" in err
    assert "Traceback" not in err


async def test_session_command_against_the_data_port_fails_saying_so(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession,
) -> None:
    """The data port proxies /admin/... to a backend: that answer is no session document."""
    pop = await start_pop()
    proxy = await start_proxy([pop])
    await wait_routable(proxy, pop.state.backend_id)
    await chat(http, proxy.url, "alice")
    code, out, err = await _pinproxy("session", "alice", "--admin", proxy.url)
    assert code == 1
    assert out == ""
    assert f"{proxy.url}/admin/sessions/alice is pinproxy's data port, not its admin API" in err
    assert "Traceback" not in err
