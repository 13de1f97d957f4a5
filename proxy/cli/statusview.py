"""PURE: the rollout picture (``GET /admin/rollout``) as text, for ``pinproxy status``.

No I/O and no clock: times are printed in UTC from the document's own wall-clock
seconds, so the same document always renders the same. The grid is regions x
versions: each cell the region's healthy replicas reporting that version, the
region's current version marked ``*``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from proxy.cli.sessionview import format_time, table

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

_NONE = "-"
_EVENTS_SHOWN = 10


def _text(value: object) -> str:
    return _NONE if value is None or value == "" else " ".join(str(value).split())


def region_state(region: Mapping[str, Any]) -> str:
    """``steady``, ``mixed (...)``, ``soaking since T until U``, ``halted (...)``."""
    state = str(region.get("state", ""))
    if state == "soaking":
        return (f"soaking since {format_time(region.get('since'))}"
                f" until {format_time(region.get('soak_until'))}")
    if state == "mixed":
        held = region.get("held")
        why = f", held back: {_text(held)}" if held else ""
        return f"mixed (-> {_text(region.get('candidate'))}{why})"
    if state == "halted":
        return f"halted ({_text(region.get('halted'))} rolled back)"
    return _text(state)


def grid(regions: Sequence[Mapping[str, Any]]) -> list[str]:
    """Regions x versions: healthy replicas per version, current marked ``*``."""
    versions = sorted({key for r in regions for key in (r.get("replicas") or {})}
                      | {str(r.get("current")) for r in regions if r.get("current")})
    header = ("REGION", "MODE", "STATE", *versions)
    rows = []
    for r in regions:
        replicas = r.get("replicas") or {}
        cells = []
        for key in versions:
            count = str(replicas.get(key, 0))
            cells.append(f"{count}*" if key == r.get("current") else count)
        rows.append((_text(r.get("region")), _text(r.get("mode")), region_state(r), *cells))
    return table(header, rows)


def _detail(detail: object) -> str:
    if not isinstance(detail, dict) or not detail:
        return _NONE
    return " ".join(f"{k}={_text(v)}" for k, v in detail.items())


def render_status(document: Mapping[str, Any], *, events: int = _EVENTS_SHOWN) -> str:
    """The grid, blocked versions, rollbacks, then the latest ``events`` decisions."""
    regions = document.get("regions") or []
    lines = grid(regions) if regions else ["no region has a rollout state yet"]
    lines.append("(cells: healthy replicas per version; * the region's current version for "
                 "new sessions)")
    lines.append("")
    blocked = document.get("blocked") or []
    lines.append(f"blocked    {', '.join(map(_text, blocked)) if blocked else '(none)'}")
    rollbacks = document.get("rollbacks") or {}
    moved = ", ".join(f"{_text(k)} -> {_text(v)}" for k, v in sorted(rollbacks.items()))
    lines.append(f"rollbacks  {moved or '(none)'}")
    recent = list(document.get("events") or [])[-events:] if events else []
    lines.append("")
    if document.get("events_complete") is False:
        lines.append(f"(the shared store is unavailable ({_text(document.get('events_error'))}): "
                     "only the asked replica's own decisions are listed)")
    if not recent:
        lines.append("recent events: none")
    else:
        lines.append(f"recent events: last {len(recent)}, oldest first")
        lines += table(("TIME (UTC)", "KIND", "REGION", "VERSION", "REPLICA", "DETAIL"), [
            (format_time(e.get("at")), _text(e.get("kind")), _text(e.get("region")),
             _text(e.get("version")), _text(e.get("replica")), _detail(e.get("detail")))
            for e in recent
        ])
    return "\n".join(lines) + "\n"
