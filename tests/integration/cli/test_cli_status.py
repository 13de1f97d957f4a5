"""``pinproxy status``: the rollout picture as a table, from a live proxy's admin API."""

from __future__ import annotations

import aiohttp
import orjson

from proxy.core.models import VersionBundle
from tests.fixtures.proxy import StartProxy
from tests.fixtures.sim import StartPop
from tests.integration.admin.sessions_helpers import eventually, run_cli

TOKEN = "cli-s3cret-0123456789abcdef0123456789"
V46, V47 = "prompt=v46", "prompt=v47"
FAST = {"interval_s": 0.05, "jitter": 0.0}


async def test_status_shows_regions_by_versions_states_blocked_and_events(
    start_pop: StartPop, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    eu = [await start_pop(f"eu-{i}", "eu", "v46") for i in range(2)]
    us = await start_pop("us-1", "us", "v46")
    proxy = await start_proxy([*eu, us], admin={"token": TOKEN}, discovery=FAST)

    def current(region: str) -> str | None:
        rs = proxy.services.rollout.state.regions.get(region)
        return None if rs is None else rs.current

    await eventually(lambda: current("eu") == V46 and current("us") == V46, what="initialised")
    eu[0].flip(VersionBundle(prompt="v47"))  # eu is mixed until its last replica flips
    await eventually(lambda: proxy.services.rollout.state.regions["eu"].candidate is None
                     and proxy.registry.snapshot.by_id["eu-0"].version_key == V47,
                     what="eu-0 on v47")
    async with http.post(f"{proxy.admin_url}/admin/versions/v48/block",
                         headers=proxy.admin_headers) as resp:
        assert resp.status == 200

    code, out, err = await run_cli("status", "--admin", proxy.admin_url, token=TOKEN)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["REGION", "MODE", "STATE", V46, V47]
    rows = {line.split()[0]: line.split() for line in lines[1:3]}
    assert rows["eu"][:3] == ["eu", "atomic", "steady"]  # one replica: not a candidate yet
    assert rows["eu"][-2:] == ["1*", "1"]
    assert rows["us"][-2:] == ["1*", "0"]
    assert "blocked    v48" in lines

    eu[1].flip(VersionBundle(prompt="v47"))  # the last replica: the region flips
    await eventually(lambda: current("eu") == V47, what="eu flipped")
    code, out, err = await run_cli("status", "--admin", proxy.admin_url, token=TOKEN)
    assert code == 0, err
    lines = out.splitlines()
    eu_row = next(line for line in lines if line.startswith("eu "))
    assert "soaking since 20" in eu_row
    assert eu_row.split()[-2:] == ["0", "2*"]
    events = lines[lines.index(next(x for x in lines if x.startswith("recent events"))) + 2:]
    assert [e.split()[2:5] for e in events if " flipped " in e] == [
        ["flipped", "eu", V47]]
    assert TOKEN not in out + err

    code, out, err = await run_cli("status", "--admin", proxy.admin_url, "--json",
                                   "--token", TOKEN)
    assert code == 0, err
    document = orjson.loads(out)
    assert {r["region"]: r["state"] for r in document["regions"]} == {
        "eu": "soaking", "us": "steady"}

    code, out, err = await run_cli("status", "--admin", proxy.admin_url, token="x" * 40)
    assert code == 1
    assert "401 authentication_error" in err
    assert "Traceback" not in err
