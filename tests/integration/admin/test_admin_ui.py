"""``/admin/ui`` in a real headless browser (Debian's chromium through chromedriver)
against a running proxy: it loads, shows a region flipping state after a cutover, looks
up a session, and shows and fetches nothing without a valid token."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import aiohttp
import pytest
import pytest_asyncio
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from proxy.core.models import VersionBundle
from tests.fixtures.proxy import RunningProxy, StartProxy
from tests.fixtures.sim import StartPop
from tests.integration.admin.sessions_helpers import eventually, wait_routable

pytestmark = pytest.mark.timeout(120)

TOKEN = "ui-s3cret-0123456789abcdef0123456789ab"
V46, V47 = "prompt=v46", "prompt=v47"
FAST = {"interval_s": 0.05, "jitter": 0.0}
T = TypeVar("T")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run")


# Holds every fetch until the test calls the functions in ``window.__held``; counts them
# in ``window.__inflight`` until their JSON body is read and the code awaiting it ran (the
# count drops in a task queued after that body's promise settled).
HOLD_FETCHES = """
window.__held = []; window.__inflight = 0;
const real = window.fetch;
window.fetch = (...args) => {
  window.__inflight++;
  return new Promise((go) => window.__held.push(go)).then(() => real(...args)).then((resp) => {
    const json = resp.json.bind(resp);
    resp.json = () => json().finally(() => setTimeout(() => { window.__inflight--; }, 0));
    return resp;
  });
};
"""


class Browser:
    """A chromium driven through chromedriver; every call runs in a thread, because the
    proxy it talks to runs in this test's event loop."""

    def __init__(self, driver: webdriver.Chrome) -> None:
        self.driver = driver

    async def run(self, call: Callable[[], T]) -> T:
        return await asyncio.to_thread(call)

    async def get(self, url: str) -> None:
        await self.run(lambda: self.driver.get(url))

    async def js(self, script: str, *args: Any) -> Any:
        return await self.run(lambda: self.driver.execute_script(script, *args))

    async def type_and_submit(self, field: str, text: str) -> None:
        def act() -> None:
            element = self.driver.find_element(By.ID, field)
            element.clear()
            element.send_keys(text)
            element.submit()

        await self.run(act)

    async def until(self, script: str, what: str, timeout: float = 15.0) -> Any:
        """Poll a JS expression until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.js(f"return ({script});")
            if value:
                return value
            assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
            await asyncio.sleep(0.05)


@pytest_asyncio.fixture
async def browser() -> AsyncIterator[Browser]:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    with tempfile.TemporaryDirectory(prefix="pinproxy-ui-") as profile:
        for flag in (*FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        driver = await asyncio.to_thread(
            webdriver.Chrome, service=Service("/usr/bin/chromedriver"), options=options)
        try:
            yield Browser(driver)
        finally:
            await asyncio.to_thread(driver.quit)


ROW = "document.querySelector('#grid tr[data-region=\"eu\"]')"
FETCHES = "performance.getEntriesByType('resource').map(e => e.name)"


async def _proxy(start_pop: StartPop, start_proxy: StartProxy) -> tuple[RunningProxy, Any]:
    eu = await start_pop("eu-1", "eu", "v46")
    eu2 = await start_pop("eu-2", "eu", "v46")
    us = await start_pop("us-1", "us", "v46", ttfb_ms=20)
    proxy = await start_proxy([eu, eu2, us], admin={"token": TOKEN}, discovery=FAST)
    await wait_routable(proxy, "eu-1", "eu-2", "us-1")
    rollout = proxy.services.rollout
    await eventually(lambda: set(rollout.state.regions) == {"eu", "us"}, what="regions known")
    return proxy, eu


async def test_the_page_shows_a_region_flipping_after_a_cutover_and_a_session(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession, browser: Browser
) -> None:
    proxy, eu = await _proxy(start_pop, start_proxy)
    rollout = proxy.services.rollout
    await browser.get(f"{proxy.admin_url}/admin/ui?refresh=200")
    await browser.type_and_submit("token", TOKEN)
    await browser.until(f"{ROW} && {ROW}.dataset.state === 'steady'", "eu steady")
    assert await browser.js(f"return {ROW}.dataset.current;") == V46
    assert "Bearer" not in await browser.js("return document.body.innerText;")

    # The cutover: one of eu's two replicas runs v47, and an operator makes it current
    # now (without waiting for the other).
    eu.flip(VersionBundle(prompt="v47"))
    await eventually(lambda: proxy.registry.snapshot.by_id["eu-1"].version_key == V47,
                     what="eu-1 on v47")
    async with http.put(f"{proxy.admin_url}/admin/rollout/regions/eu/current/v47",
                        headers=proxy.admin_headers) as resp:
        assert resp.status == 200, await resp.text()
    await browser.until(f"{ROW}.dataset.state === 'soaking'", "eu soaking")
    assert await browser.js(f"return {ROW}.dataset.current;") == V47
    state = await browser.js(f"return {ROW}.querySelector('.state').textContent;")
    assert state.startswith("soaking since 20")
    current = await browser.js(f"return {ROW}.querySelector('td.current').textContent;")
    assert current == "1"  # eu-1, the one replica on eu's current version
    await browser.until("document.querySelector('#events').innerText.includes('forced')",
                        "the forced decision listed")
    # Each decision names the replica that took it (the fleet's list, from the store).
    text = await browser.js("return document.querySelector('#events').innerText;")
    assert rollout.replica in text
    assert await browser.js("return document.getElementById('events-partial').hidden;")

    # Session lookup.
    async with http.post(f"{proxy.url}/v1/chat/completions", headers={"X-Session-ID": "alice"},
                         json={"model": "sim", "messages": []}) as resp:
        assert resp.status == 200
        served = resp.headers["X-Prompt-Version"]
    await browser.type_and_submit("session", "alice")
    text = await browser.until(
        "document.getElementById('session-pin') && "
        "document.getElementById('session-pin').textContent", "session shown")
    assert text.startswith(f"pinned to prompt={served} on ")
    assert await browser.js("return document.querySelectorAll('#trail tr').length;") == 2
    await browser.type_and_submit("session", "nobody")
    await browser.until("(document.getElementById('session-pin') || {}).textContent === "
                        "'no such session'", "unknown session")

    # Forgetting the token empties the page, even when a refresh is on its way: the page
    # holds the next refresh's request until the token is forgotten, then lets it answer.
    await browser.js(HOLD_FETCHES)
    await browser.until("window.__held.length > 0", "a refresh held")
    await browser.run(lambda: browser.driver.find_element(By.ID, "logout").click())
    await browser.js("window.__held.forEach((go) => go()); window.__held = [];")
    await browser.until("window.__inflight === 0", "the held refresh answered")
    assert await browser.js("return document.getElementById('view').hidden;") is True
    assert await browser.js("return document.querySelectorAll('#grid tr').length;") == 0


async def test_without_a_valid_token_the_page_shows_and_fetches_nothing(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession, browser: Browser
) -> None:
    proxy, _eu = await _proxy(start_pop, start_proxy)
    async with http.get(f"{proxy.admin_url}/admin/ui") as resp:  # the page: public
        assert resp.status == 200
        assert resp.content_type == "text/html"
        assert "script-src 'sha256-" in resp.headers["Content-Security-Policy"]
        assert "v46" not in await resp.text()
    async with http.get(f"{proxy.admin_url}/admin/rollout") as resp:  # its data: not
        assert resp.status == 401

    await browser.get(f"{proxy.admin_url}/admin/ui?refresh=200")
    await browser.until("document.readyState === 'complete'", "page loaded")
    assert await browser.js(f"return {FETCHES};") == []
    assert await browser.js("return document.getElementById('view').hidden;") is True
    assert "v46" not in await browser.js("return document.body.innerText;")

    await browser.type_and_submit("token", "wrong-" + TOKEN)
    await browser.until("document.getElementById('error').textContent === 'invalid token'",
                        "the refusal shown")
    assert await browser.js("return document.getElementById('view').hidden;") is True
    assert "eu" not in await browser.js("return document.getElementById('view').innerText;")
    # One refused call, and no polling after it.
    fetched = await browser.js(f"return {FETCHES};")
    assert fetched == [f"{proxy.admin_url}/admin/rollout"]
    # Nor is the session lookup offered.
    assert not await browser.run(
        lambda: browser.driver.find_element(By.ID, "session").is_displayed())
    assert await browser.js(f"return {FETCHES};") == fetched

    # A token in the fragment (never sent to the server) works, and leaves the URL.
    await browser.get(f"{proxy.admin_url}/admin/ui?refresh=200#token={TOKEN}")
    await browser.until(f"{ROW} && {ROW}.dataset.current === '{V46}'", "eu shown")
    assert TOKEN not in await browser.js("return location.href;")
