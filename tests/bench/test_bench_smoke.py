"""Every bench scenario, end to end with tiny sizes: the harness works and reports.

These are not performance tests: the sizes are far too small for the numbers to mean
anything. They assert that each scenario starts its processes, drives load, cleans up
and writes a report with the expected fields, plots included, and that the incident
replay keeps every pinproxy session on one version while the control does not.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from bench import incident, kill_switch, overhead, sse, store_faults, streaming, throughput
from bench.procs import find_nginx

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="the bench needs redis-server"
)


def _written(report: dict[str, Any], *pngs: str) -> dict[str, Any]:
    out = Path(report["out"])
    for name in ("report.json", "raw.json", "summary.md", *pngs):
        assert (out / name).is_file(), f"{name} missing from {out}"
        assert (out / name).stat().st_size > 0
    for png in pngs:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["scenario"] == report["scenario"]
    assert on_disk["machine"]["nproc"] >= 1
    assert "layout" in on_disk
    return on_disk


def test_overhead_reports_direct_proxy_and_added_percentiles(tmp_path: Path) -> None:
    report = overhead.run(
        overhead.OverheadConfig(rounds=2, requests=20, warmup=10, out_root=tmp_path)
    )
    on_disk = _written(report, "latency-cdf.png", "added-by-round.png")
    assert len(on_disk["rounds"]) == 2
    for side in ("direct", "proxy", "added"):
        for p in ("p50_ms", "p90_ms", "p99_ms"):
            assert on_disk["summary"][side][p]["median"] is not None
    assert on_disk["errors"] == {"direct": 0, "proxy": 0}
    assert set(on_disk["targets"]) == {"added_p50_ms", "added_p99_ms", "errors"}
    assert on_disk["pooled"]["proxy"]["count"] == 40


def test_throughput_reports_ceilings_open_loop_cpu_and_ratios(tmp_path: Path) -> None:
    report = throughput.run(
        throughput.ThroughputConfig(
            duration_s=0.5,
            warmup_s=0.2,
            concurrency=8,
            levels=(0.5,),
            rounds=2,
            sessions=50,
            targets=("direct", "pinproxy-1w", "nginx", "python-floor"),
            out_root=tmp_path,
        )
    )
    on_disk = _written(report, "latency-cdf.png", "ceilings.png", "cpu-per-request.png")
    results = on_disk["results"]
    assert {"direct", "pinproxy-1w", "python-floor"} <= set(results)
    if find_nginx() is None:
        assert "nginx" in on_disk["skipped"]
    else:
        assert "nginx" in results
    for res in results.values():
        assert [r["round"] for r in res["rounds"]] == [0, 1]
        assert res["ceiling"] in res["rounds"]
        assert all(r["machine_busy_cores"] > 0 for r in res["rounds"])
        ceiling = res["ceiling"]
        assert ceiling["rps"] > 0
        assert ceiling["errors"] == 0
        for key in ("p50_ms", "p99_ms"):
            assert key in ceiling["latency"]
        assert "proxy_cpu_s_per_1k" in ceiling
        [level] = res["open_loop"]
        assert level["mode"] == "open"
        assert level["completed"] > 0
    assert results["pinproxy-1w"]["ceiling"]["proxy_cpu_us_per_request"] > 0
    assert on_disk["ratios"]["pinproxy-1w/direct"] is not None
    assert on_disk["generator"]["closed_loop"] in ("wrk", "builtin")
    assert on_disk["sim_pop_ceiling"]["rps"] > 0
    assert on_disk["targets"]["pinproxy_errors"]["value"] == 0
    # vllm-router is not a target here (CI does not install it): its ratio is absent.
    assert on_disk["ratios_per_round"]["cpu_per_request pinproxy-1w/vllm-router"] is None
    if "nginx" in results:
        per_round = on_disk["ratios_per_round"]["cpu_per_request pinproxy-1w/nginx"]
        assert len(per_round["rounds"]) == 2
    # The Python floor answered every request (errors 0 above) and is measured per round.
    floor = on_disk["ratios_per_round"]["cpu_per_request pinproxy-1w/python-floor"]
    assert len(floor["rounds"]) == 2
    assert floor["median"] > 0


def test_streaming_reports_ttft_gaps_completion_and_rss(tmp_path: Path) -> None:
    report = streaming.run(
        streaming.StreamingConfig(
            streams=(10,),
            tokens_per_second=20.0,
            completion_tokens=4,
            ramp_s=0.2,
            out_root=tmp_path,
        )
    )
    on_disk = _written(report, "ttft-cdf.png", "ttft-hist.png", "inter-chunk-cdf.png")
    [level] = on_disk["levels"]
    assert level["streams"] == 10
    assert level["proxy"]["completed"] == 10
    assert level["direct"]["completed"] == 10
    assert level["streams_lost"] == 0
    assert level["added_ttft_p99_ms"] is not None
    assert level["proxy"]["inter_chunk"]["count"] > 0
    assert level["proxy_rss_mb"]["peak"] > 0
    assert set(on_disk["targets"]) == {"added_ttft_p99_ms", "streams_lost", "rss_mb_per_1k_streams"}


def test_incident_replay_pinproxy_keeps_sessions_on_one_version_control_does_not(
    tmp_path: Path,
) -> None:
    report = incident.run(
        incident.IncidentConfig(
            duration_s=4.0,
            sessions=30,
            turns=4,
            poll_interval_s=0.2,
            out_root=tmp_path,
        )
    )
    on_disk = _written(report, "versions-over-time.png")
    pinned, control = on_disk["runs"]["pinproxy"], on_disk["runs"]["control"]
    for run in (pinned, control):
        assert run["requests"] == 30 * 4
        assert set(run["over_time"]["series"]) == set(incident.REGIONS)
        assert "failures_by_reason" in run
    assert pinned["sessions_mixed_versions"] == 0, pinned["mixed_session_ids"]
    assert pinned["failures_attributable_to_pinning_while_served"] == 0
    assert control["sessions_mixed_versions"] > 0
    assert on_disk["targets"]["pinproxy_mixed_sessions"]["ok"] is True
    assert on_disk["targets"]["control_shows_damage"]["ok"] is True


def test_kill_switch_replay_trips_on_the_bad_version_and_marks_every_change(
    tmp_path: Path,
) -> None:
    report = kill_switch.run(
        # v47 far worse than v46 and a small sample floor: each replica judges only what
        # it proxied, and with a floor of 20 and one bad answer in 4 it tripped at 4.7 s
        # of the 8 here when the machine was quiet, and not at all under CI's own load.
        kill_switch.KillSwitchConfig(
            duration_s=8.0, sessions=80, turns=5, bad_every=3, min_samples=10,
            out_root=tmp_path,
        )
    )
    on_disk = _written(report, "versions-over-time.png")
    result = on_disk["result"]
    assert result["requests"] == 80 * 5
    assert result["tripped"] is True, on_disk["events"]
    assert result["evidence"]["signal"] == "structured_output"
    assert 0 < result["time_to_trip_s"] < 8.0
    assert result["rolled_back"] == ["us-east"]
    assert result["sessions_exposed_before_trip"] > 0
    assert result["version_changes"]["unmarked"] == 0
    assert result["v47_answers_after_grace"] == 0
    assert all(t["ok"] for t in on_disk["targets"].values()), on_disk["targets"]


def test_store_faults_replay_reports_every_phase_and_changes_no_session(
    tmp_path: Path,
) -> None:
    report = store_faults.run(
        store_faults.StoreFaultsConfig(
            sessions=6, phase_s=0.5, pause_s=0.3, outage_s=0.2, new_sessions=10,
            sentinel=False, out_root=tmp_path,
        )
    )
    on_disk = _written(report)
    run = on_disk["runs"]["standalone"]
    assert [p["name"] for p in run["phases"]] == [
        "steady", "new-sessions", "pause", "kill-restart-empty", "flushall"]
    assert run["mixed_sessions"] == 0
    assert run["silent_repins"] == 0
    steady = run["phases"][0]
    assert steady["commands_per_request"] is not None
    assert steady["requests"] > 0
    for phase in run["phases"][2:]:
        assert phase["recovery_s"] is not None, phase
    assert on_disk["targets"]["mixed_sessions"]["ok"] is True


def test_sse_reports_cpu_per_event_gaps_and_whether_direct_keeps_up(tmp_path: Path) -> None:
    # pinproxy-only mode: CI installs neither nginx nor vllm-router for this.
    report = sse.run(
        sse.SseConfig(
            # 6@4: 1.25-s streams, so a steady window (every stream open, none ended)
            # of 0.55 s fits after the 0.2-s ramp.
            levels=("8", "6@4"),
            completion_tokens=5,
            ramp_s=0.2,
            targets=("direct", "pinproxy"),
            out_root=tmp_path,
        )
    )
    on_disk = _written(report, "inter-chunk-cdf.png")
    first, second = on_disk["levels"]
    assert (first["streams"], first["tokens_per_second"], first["lowered"]) == (8, 50.0, False)
    assert (second["streams"], second["tokens_per_second"], second["lowered"]) == (6, 4.0, True)
    for level in (first, second):
        for name in ("direct", "pinproxy"):
            side = level[name]
            assert side["completed"] == level["streams"], side["failed"]
            # 5 tokens, then the usage event and [DONE], on every stream.
            assert side["events"] == side["events_expected"] == level["streams"] * 7
            assert side["inter_chunk"]["count"] > 0
        assert level["pinproxy"]["cpu_us_per_event"] is not None
        assert level["pinproxy"]["added_gap_p99_ms"] is not None
        assert isinstance(level["direct_keeps_up"], bool)
    # 0.1-s streams leave no steady window; the 1.25-s ones do, and it saw events.
    assert first["pinproxy"]["cpu_us_per_event_steady"] is None
    assert first["pinproxy"]["cpu_ms_per_stream_beyond_relay"] is None
    steady = second["pinproxy"]
    assert steady["steady_s"] == 0.55
    assert steady["cpu_us_per_event_steady"] is not None
    assert steady["cpu_us_per_event_steady"] >= 0
    assert steady["cpu_ms_per_stream_beyond_relay"] is not None
    assert second["direct"]["cpu_us_per_event_steady"] is None  # no process of its own
    assert on_disk["targets"]["pinproxy_streams_lost"]["value"] == 0
    assert "cpu_per_event_vs_vllm_router" not in on_disk["targets"]
