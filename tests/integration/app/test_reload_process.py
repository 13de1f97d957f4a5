"""Live reload of ``pinproxy serve`` processes: SIGHUP, and ``--workers 2``.

The config file is rewritten on disk and the running process re-reads it: a signal's
outcome is one log line; with two workers each worker reloads, whichever of them
took the admin call.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import orjson

from tests.fixtures.proxy import ProxyProcess, free_port
from tests.fixtures.sim import StartPop

CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hello"}]}


def _config(admin_port: int, backends: list[tuple[str, str]], *, redis_url: str | None = None,
            extra: str = "", level: str = "info") -> str:
    store = f'[store]\nkind = "redis"\nurl = "{redis_url}"\n' if redis_url else ""
    text = (
        f'[listen]\nhost = "127.0.0.1"\nshutdown_timeout_s = 5\n{store}'
        f'[discovery]\ninterval_s = 0.2\n[log]\nlevel = "{level}"\nformat = "json"\n'
        f'[admin]\nport = {admin_port}\n{extra}'
    )
    for backend_id, url in backends:
        text += f'[[backends]]\nid = "{backend_id}"\nregion = "r1"\nurl = "{url}"\n'
    return text


def _messages(proxy: ProxyProcess, prefix: str) -> list[tuple[object, str]]:
    """(worker, message) of the JSON log lines whose message starts with ``prefix``."""
    out = []
    for raw in proxy.log_path.read_text(errors="replace").splitlines():
        if raw.startswith("{"):
            line = orjson.loads(raw)
            message = str(line.get("message", ""))
            if message.startswith(prefix):
                out.append((line.get("worker"), message))
    return out


def _worker_pids(supervisor: int) -> list[int]:
    """The supervisor's worker processes (spawned children, not its resource tracker)."""
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return [int(pid) for pid in children
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


async def _backend_ids(admin_url: str) -> set[str]:
    # A fresh connection each time: with several workers any of them may answer.
    async with aiohttp.ClientSession() as fresh, fresh.get(f"{admin_url}/admin/backends") as resp:
        assert resp.status == 200
        return {b["id"] for b in (await resp.json())["backends"]}


async def test_sighup_reloads_the_file_and_a_bad_file_is_one_log_line(
    start_pop: StartPop, proxy_processes: Callable[..., ProxyProcess]
) -> None:
    a = await start_pop("pop-a", "r1", "v1")
    b = await start_pop("pop-b", "r1", "v1")
    admin_port = free_port()
    admin_url = f"http://127.0.0.1:{admin_port}"
    proxy = proxy_processes(_config(admin_port, [("pop-a", a.url)]))
    await proxy.wait_listening()
    await proxy.until(lambda: bool(_messages(proxy, "admin API listening")), "admin up")
    assert await _backend_ids(admin_url) == {"pop-a"}
    assert proxy.proc is not None

    proxy.config_path.write_text(_config(admin_port, [("pop-a", a.url), ("pop-b", b.url)]))
    proxy.proc.send_signal(signal.SIGHUP)
    await proxy.until(lambda: bool(_messages(proxy, "config reloaded: changed backends")),
                 "reload applied")
    assert await _backend_ids(admin_url) == {"pop-a", "pop-b"}

    proxy.config_path.write_text(
        _config(admin_port, [("pop-a", a.url)], extra="[routing]\nmax_attempts = 0\n"))
    proxy.proc.send_signal(signal.SIGHUP)
    await proxy.until(lambda: bool(_messages(proxy, "config reload refused")), "refusal")
    refusals = _messages(proxy, "config reload refused")
    assert len(refusals) == 1
    assert "routing.max_attempts" in refusals[0][1]
    assert "Traceback" not in proxy.log(tail=None)
    # The running config stays: both backends, and the proxy still answers.
    assert await _backend_ids(admin_url) == {"pop-a", "pop-b"}
    async with aiohttp.ClientSession() as http, http.post(
        f"{proxy.url}/v1/chat/completions", json=CHAT, headers={"X-Session-ID": "s1"}
    ) as resp:
        assert resp.status == 200
    assert proxy.proc.poll() is None

    # log.level changes live: at "warning" this reload's INFO outcome line is not
    # written, while the next refusal (a WARNING, logged after it) is.
    proxy.config_path.write_text(_config(admin_port, [("pop-a", a.url)], level="warning"))
    proxy.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while await _backend_ids(admin_url) != {"pop-a"}:
        assert time.monotonic() < deadline, proxy.log()
        await asyncio.sleep(0.05)
    proxy.config_path.write_text(
        _config(admin_port, [("pop-a", a.url)], extra="[routing]\nmax_attempts = 0\n"))
    proxy.proc.send_signal(signal.SIGHUP)
    await proxy.until(lambda: len(_messages(proxy, "config reload refused")) == 2,
                      "second refusal")
    assert await _backend_ids(admin_url) == {"pop-a"}
    assert len(_messages(proxy, "config reloaded")) == 1


async def test_with_two_workers_an_admin_reload_and_a_sighup_reach_each_worker(
    start_pop: StartPop, proxy_processes: Callable[..., ProxyProcess], redis_url: str
) -> None:
    a = await start_pop("pop-a", "r1", "v1")
    b = await start_pop("pop-b", "r1", "v1")
    admin_port = free_port()
    admin_url = f"http://127.0.0.1:{admin_port}"
    proxy = proxy_processes(_config(admin_port, [("pop-a", a.url)], redis_url=redis_url),
                            "--workers", "2")
    await proxy.until(lambda: {w for w, _ in _messages(proxy, "admin API listening")} == {0, 1},
                 "both workers listening")

    proxy.config_path.write_text(
        _config(admin_port, [("pop-a", a.url), ("pop-b", b.url)], redis_url=redis_url))
    async with aiohttp.ClientSession() as http, http.post(f"{admin_url}/admin/reload") as resp:
        body = await resp.json()
        assert (resp.status, body["status"], body["backends_added"]) == (
            200, "applied", ["pop-b"])
    await proxy.until(
        lambda: {w for w, _ in _messages(proxy, "config reloaded: changed backends")} == {0, 1},
        "both workers reloaded")
    # Every worker now routes with pop-b, whichever answers.
    for _ in range(8):
        assert await _backend_ids(admin_url) == {"pop-a", "pop-b"}

    # A worker that dies is restarted with the start's settings and catches up at once.
    assert proxy.proc is not None
    (victim, *_) = _worker_pids(proxy.proc.pid)
    os.kill(victim, signal.SIGKILL)
    await proxy.until(lambda: bool(_messages(proxy, "worker ")), "the restart")
    await proxy.until(
        lambda: len(_messages(proxy, "config reloaded: changed backends")) == 3,
        "the restarted worker caught up")
    await proxy.until(lambda: len(_messages(proxy, "admin API listening")) == 3,
                      "the restarted worker listening")
    for _ in range(8):
        assert await _backend_ids(admin_url) == {"pop-a", "pop-b"}

    proxy.config_path.write_text(
        _config(admin_port, [("pop-a", a.url)], redis_url=redis_url,
                extra='[versions]\ndimensions = ["prompt"]\n'))
    assert proxy.proc is not None
    proxy.proc.send_signal(signal.SIGHUP)  # to the supervisor, as an operator would
    await proxy.until(lambda: len(_messages(proxy, "config reload refused")) == 2,
        "each worker refused")
    refusals = _messages(proxy, "config reload refused")
    assert sorted(str(w) for w, _ in refusals) == ["0", "1"]
    assert all("versions.dimensions" in message for _, message in refusals)
    assert await _backend_ids(admin_url) == {"pop-a", "pop-b"}
