"""PURE: a session document from the admin API (``GET /admin/sessions/{id}``) as text.

Used by ``pinproxy session``. No I/O and no clock: timestamps are printed in UTC from
the document's own wall-clock seconds, so the same document always renders the same.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

_COLUMNS = ("TIME (UTC)", "REQUEST ID", "TRACE ID", "REGION", "BACKEND", "VERSION", "STATUS",
            "LATENCY", "NOTE")
_NONE = "-"


def format_time(seconds: object) -> str:
    """``2026-01-02 03:04:05.678`` in UTC, or ``-`` for anything that is not a time."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        return _NONE
    try:
        moment = datetime.fromtimestamp(seconds, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return _NONE
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


def _text(value: object) -> str:
    if value is None or value == "":
        return _NONE
    # Keep the table one line per record whatever a value holds.
    return " ".join(str(value).split())


def _latency(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _NONE
    return f"{value:.1f} ms"


def _note(record: Mapping[str, Any]) -> str:
    notes = []
    if record.get("version_changed"):
        notes.append(f"version {_text(record['version_changed'])}")
    if record.get("error_type"):
        notes.append(_text(record["error_type"]))
    if record.get("backend_id") is None and str(record.get("path", "")).startswith("/admin/"):
        notes.append("admin")
    return ", ".join(notes) or _NONE


def trail_rows(trail: Sequence[Mapping[str, Any]]) -> list[tuple[str, ...]]:
    """One row of cells per record, in the order given (the API's: oldest first)."""
    return [
        (
            format_time(r.get("at")),
            _text(r.get("request_id")),
            _text(r.get("trace_id")),
            _text(r.get("region")),
            _text(r.get("backend_id")),
            _text(r.get("version_key")),
            _text(r.get("status")),
            _latency(r.get("latency_ms")),
            _note(r),
        )
        for r in trail
    ]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns separated by two spaces; trailing blanks trimmed."""
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in (header, *rows)
    ]


def render_session(document: Mapping[str, Any]) -> str:
    """The pin block, then the trail as a table (or a line saying it is empty)."""
    lines = [f"session    {_text(document.get('session_id'))}"]
    pin = document.get("pin")
    if isinstance(pin, dict):
        lines += [
            f"pinned to  {_text(pin.get('version_key'))}"
            f"  (prompt {_text(pin.get('prompt_version'))})",
            f"pinned at  {format_time(pin.get('pinned_at'))} UTC",
            f"where      {_text(pin.get('backend_id'))} ({_text(pin.get('region'))})",
        ]
    else:
        lines.append("pinned to  (not pinned now)")
    trail = document.get("trail") or []
    kept = document.get("records_per_session")
    lines.append("")
    if not trail:
        lines.append("audit trail: no records")
    else:
        most = f" (at most {kept} kept)" if kept is not None else ""
        lines.append(f"audit trail: last {len(trail)} requests, oldest first{most}")
        lines += table(_COLUMNS, trail_rows(trail))
    return "\n".join(lines) + "\n"
