"""The README's client guide, run as written: each snippet against a live pinproxy.

The snippets are read from the README's "Client guide" section (so the guide cannot
drift from what works), their base URL pointed at a pinproxy in front of a simulated
POP, and run with the real SDKs (openai, litellm, langchain-openai) and curl. Each must
exit 0, print the served prompt version where it reads it, and leave a pin for every
session id it sends, which shows pinproxy received the id where the snippet put it.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.fixtures.proxy import RunningProxy, StartProxy
from tests.fixtures.sim import StartPop
from tests.integration.admin.sessions_helpers import wait_routable

ROOT = Path(__file__).resolve().parents[3]
README_URL = "http://localhost:8080"
PROMPT = "v47"
# Where the snippets put session ids: headers, OpenAI's `user`, the metadata body field.
_SESSION_IDS = re.compile(
    r"""X-Session-ID["']?:\s*["']?([A-Za-z0-9_-]+)|user="([A-Za-z0-9_-]+)"|"session_id":\s*"([A-Za-z0-9_-]+)\""""
)


def client_guide_snippets() -> list[tuple[str, str]]:
    """(language, code) of every fenced block in the README's Client guide section."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Client guide\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```(python|sh)\n(.*?)^```$", section, re.M | re.S)
    assert len(blocks) >= 6, "the client guide lost snippets"
    return blocks


SNIPPETS = client_guide_snippets()


def _sessions(code: str) -> list[str]:
    return [next(g for g in m.groups() if g) for m in _SESSION_IDS.finditer(code)]


def _label(snippet: tuple[str, str]) -> str:
    language, code = snippet
    tool = "curl" if language == "sh" else re.search(r"^(?:from|import) (\w+)", code, re.M)
    name = tool if isinstance(tool, str) else tool.group(1) if tool else language
    return f"{name}-{'-'.join(_sessions(code))}"


async def _run(language: str, code: str, proxy_url: str) -> tuple[int, str, str]:
    code = code.replace(README_URL, proxy_url)
    command = [sys.executable, "-c", code] if language == "python" else ["bash", "-c", code]
    env = {
        **os.environ,
        # LiteLLM would fetch its model price list from the internet at import.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_TELEMETRY": "False",
        "NO_PROXY": "*",
    }
    proc = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _pinned_prompt(http: aiohttp.ClientSession, proxy: RunningProxy, session: str) -> str:
    """The prompt version the admin API says ``session`` is pinned to ("" if none)."""
    async with http.get(
        f"{proxy.admin_url}/admin/sessions/{session}", headers=proxy.admin_headers
    ) as resp:
        if resp.status == 404:
            return ""
        assert resp.status == 200, await resp.text()
        pin = (await resp.json())["pin"]
        return "" if pin is None else str(pin["prompt_version"])


async def _guide_proxy(start_pop: StartPop, start_proxy: StartProxy) -> RunningProxy:
    pop = await start_pop("pop-a", "r1", PROMPT)
    # The session-id sources of config/example.toml, which the guide's `user` line needs.
    proxy = await start_proxy(
        [pop],
        sessions={
            "sources": [
                {"kind": "header", "name": "X-Session-ID"},
                {"kind": "body", "name": "metadata.session_id"},
                {"kind": "body", "name": "user"},
            ]
        },
    )
    await wait_routable(proxy, pop.state.backend_id)
    return proxy


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[_label(s) for s in SNIPPETS])
async def test_client_guide_snippet_runs_and_pins_its_session(
    snippet: tuple[str, str],
    start_pop: StartPop,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
) -> None:
    language, code = snippet
    sessions = _sessions(code)
    assert sessions, "every snippet sends a session id"
    assert README_URL in code
    proxy = await _guide_proxy(start_pop, start_proxy)
    code_, out, err = await _run(language, code, proxy.url)
    assert code_ == 0, out + err
    if re.search("x-prompt-version", code, re.I):
        assert re.search(rf"(^|\s)x-prompt-version: {PROMPT}\s|^{PROMPT}\b", out, re.I | re.M), out
    for session in sessions:
        assert await _pinned_prompt(http, proxy, session) == PROMPT, session


async def test_litellm_metadata_never_reaches_pinproxy(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """What the guide warns about: LiteLLM keeps `metadata=` for itself."""
    proxy = await _guide_proxy(start_pop, start_proxy)
    code = f"""
import litellm
litellm.completion(
    model="openai/gpt-4o-mini", api_base="{proxy.url}/v1", api_key="sk-x",
    messages=[{{"role": "user", "content": "Hello"}}],
    metadata={{"session_id": "ghost"}},
)
"""
    code_, out, err = await _run("python", code, proxy.url)
    assert code_ == 0, out + err
    assert await _pinned_prompt(http, proxy, "ghost") == ""


async def test_openai_metadata_in_extra_body_pins_through_the_body_source(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """The guide's `extra_body={"metadata": {"session_id": ...}}` alternative."""
    proxy = await _guide_proxy(start_pop, start_proxy)
    code = f"""
from openai import OpenAI
client = OpenAI(base_url="{proxy.url}/v1", api_key="sk-x")
client.chat.completions.create(
    model="gpt-4o-mini", messages=[{{"role": "user", "content": "Hello"}}],
    extra_body={{"metadata": {{"session_id": "helen"}}}},
)
"""
    code_, out, err = await _run("python", code, proxy.url)
    assert code_ == 0, out + err
    assert await _pinned_prompt(http, proxy, "helen") == PROMPT


async def test_openai_sdk_raises_and_retries_pinproxys_own_503(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """The guide's promise about errors: an OpenAI-shaped 503 with a code, retried by the
    SDK after Retry-After, then raised as APIStatusError carrying that code."""
    pop = await start_pop("pop-a", "r1", PROMPT)
    proxy = await start_proxy([pop])
    await wait_routable(proxy, pop.state.backend_id)
    async with http.post(
        f"{proxy.url}/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        headers={"X-Session-ID": "ivan"},
    ) as resp:
        assert resp.status == 200
    await pop.stop()  # ivan's version is gone: pinproxy answers 503 version_unavailable
    code = f"""
import openai
client = openai.OpenAI(base_url="{proxy.url}/v1", api_key="sk-x", max_retries=1,
                       default_headers={{"X-Session-ID": "ivan"}})
try:
    client.chat.completions.create(model="m", messages=[{{"role": "user", "content": "hi"}}])
except openai.APIStatusError as exc:
    print(exc.status_code, exc.body["code"], exc.response.headers["Retry-After"])
"""
    code_, out, err = await _run("python", code, proxy.url)
    assert code_ == 0, out + err
    assert out.split() == ["503", "version_unavailable", "1"]
    answered = proxy.metric(
        "pinproxy_version_unavailable_responses_total", version_key=f"prompt={PROMPT}"
    )
    assert answered == 2  # the first answer and the SDK's one retry
