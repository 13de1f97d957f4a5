"""The session table ``pinproxy session`` prints: a pure function of the API document."""

from __future__ import annotations

from typing import Any

from proxy.cli.sessionview import format_time, render_session, table

PIN = {"version_key": "prompt=v47,parser=json-v2", "prompt_version": "v47",
       "backend_id": "us-east-1", "region": "us-east", "pinned_at": 1_700_000_000.25}


def _record(**changes: Any) -> dict[str, Any]:
    record = {"at": 1_700_000_001.5, "request_id": "req-1", "trace_id": "ab" * 16,
              "method": "POST", "path": "/v1/chat/completions", "status": 200,
              "backend_id": "us-east-1", "region": "us-east",
              "version_key": "prompt=v47,parser=json-v2", "latency_ms": 12.34, "ttfb_ms": 3.0,
              "version_changed": None, "error_type": None}
    return {**record, **changes}


def test_format_time_is_utc_with_milliseconds_and_tolerates_junk() -> None:
    assert format_time(1_700_000_000.25) == "2023-11-14 22:13:20.250"
    assert format_time(0) == "1970-01-01 00:00:00.000"
    for junk in (None, "x", True, 1e300, float("nan")):
        assert format_time(junk) == "-"


def test_table_aligns_columns_and_trims_trailing_blanks() -> None:
    assert table(("A", "BB"), [("xyz", "1"), ("q", "")]) == ["A    BB", "xyz  1", "q"]


def test_render_pin_and_trail() -> None:
    text = render_session({
        "session_id": "alice", "pin": PIN, "records_per_session": 100,
        "trail": [
            _record(),
            _record(at=1_700_000_002.0, request_id="req-2", method="PUT",
                    path="/admin/sessions/{session_id}/pin", backend_id=None, region=None,
                    version_key="prompt=v48", latency_ms=0.4, ttfb_ms=None,
                    version_changed="prompt=v47,parser=json-v2 -> prompt=v48"),
            _record(at=1_700_000_003.0, request_id="req-3", status=503, backend_id=None,
                    region=None, version_key="prompt=v48", latency_ms=2000.0,
                    error_type="version_unavailable"),
        ],
    })
    lines = text.splitlines()
    assert lines[:5] == [
        "session    alice",
        "pinned to  prompt=v47,parser=json-v2  (prompt v47)",
        "pinned at  2023-11-14 22:13:20.250 UTC",
        "where      us-east-1 (us-east)",
        "",
    ]
    assert lines[5] == "audit trail: last 3 requests, oldest first (at most 100 kept)"
    assert lines[6].startswith("TIME (UTC)               REQUEST ID  TRACE ID")
    assert lines[7].split() == ["2023-11-14", "22:13:21.500", "req-1", "ab" * 16, "us-east",
                                "us-east-1", "prompt=v47,parser=json-v2", "200", "12.3", "ms",
                                "-"]
    assert lines[8].split()[2:] == ["req-2", "ab" * 16, "-", "-", "prompt=v48", "200", "0.4",
                                    "ms", "version", "prompt=v47,parser=json-v2", "->",
                                    "prompt=v48,", "admin"]
    assert lines[9].split()[-4:] == ["503", "2000.0", "ms", "version_unavailable"]
    # Columns line up: every row's STATUS starts where the header's does.
    column = lines[6].index("STATUS")
    assert all(line[column:column + 3] in ("200", "503") for line in lines[7:])
    assert text.endswith("\n")


def test_render_without_pin_or_trail_and_with_odd_values() -> None:
    text = render_session({"session_id": "bob", "pin": None, "trail": []})
    assert text == "session    bob\npinned to  (not pinned now)\n\naudit trail: no records\n"
    odd = render_session({"session_id": "x", "pin": None,
                          "trail": [_record(request_id="a\tb\nc", latency_ms=None)]})
    row = odd.splitlines()[-1]
    assert "a b c" in row
    assert "\t" not in odd
