"""statusview.render_status: the rollout picture as the operator reads it."""

from __future__ import annotations

from typing import Any

from proxy.cli.statusview import region_state, render_status

T0 = 1_764_770_400.0  # 2025-12-03 14:00:00 UTC
V46, V47 = "prompt=v46", "prompt=v47"


def region(name: str, state: str, current: str, replicas: dict[str, int],
           **extra: Any) -> dict[str, Any]:
    return {"region": name, "mode": "atomic", "state": state, "current": current,
            "since": T0, "previous": None, "soak_until": None, "candidate": None,
            "held": None, "halted": None, "replicas": replicas, **extra}


DOCUMENT: dict[str, Any] = {
    "regions": [
        region("ap", "halted", V46, {V46: 2}, halted=V47),
        region("eu", "soaking", V47, {V47: 3}, previous=V46, soak_until=T0 + 600),
        region("us", "mixed", V46, {V46: 1, V47: 2}, candidate=V47, held="soak_limit"),
        region("sa", "steady", V46, {V46: 2}),
    ],
    "blocked": [V47],
    "rollbacks": {V47: V46},
    "events": [
        {"at": T0 + i, "kind": "flipped", "region": "eu", "version": V47,
         "detail": {"previous": V46}, "replica": f"pod-{i % 2}/7/ab12cd"} for i in range(12)
    ],
}


def test_each_region_state_reads_as_the_issue_names_it() -> None:
    ap, eu, us, sa = DOCUMENT["regions"]
    assert region_state(sa) == "steady"
    assert region_state(eu) == ("soaking since 2025-12-03 14:00:00.000 "
                                "until 2025-12-03 14:10:00.000")
    assert region_state(us) == "mixed (-> prompt=v47, held back: soak_limit)"
    assert region_state(ap) == "halted (prompt=v47 rolled back)"


def test_the_grid_counts_replicas_per_version_and_marks_the_current_one() -> None:
    lines = render_status(DOCUMENT).splitlines()
    assert lines[0].split() == ["REGION", "MODE", "STATE", V46, V47]
    rows = {line.split()[0]: line for line in lines[1:5]}
    assert rows["ap"].split()[-2:] == ["2*", "0"]
    assert rows["eu"].split()[-2:] == ["0", "3*"]
    assert rows["us"].split()[-2:] == ["1*", "2"]
    assert rows["sa"].split()[-2:] == ["2*", "0"]
    assert "blocked    prompt=v47" in lines
    assert "rollbacks  prompt=v47 -> prompt=v46" in lines


def test_recent_events_are_the_latest_oldest_first() -> None:
    lines = render_status(DOCUMENT, events=3).splitlines()
    start = lines.index("recent events: last 3, oldest first")
    assert lines[start + 1].split()[:3] == ["TIME", "(UTC)", "KIND"]
    times = [line.split()[1] for line in lines[start + 2:]]
    assert times == ["14:00:09.000", "14:00:10.000", "14:00:11.000"]
    assert lines[-1].endswith("flipped  eu      prompt=v47  pod-1/7/ab12cd  previous=prompt=v46")
    assert not any("shared store is unavailable" in line for line in lines)


def test_a_list_of_one_replicas_decisions_says_so() -> None:
    partial = {**DOCUMENT, "events_complete": False,
               "events_error": "rollout_events_unavailable"}
    lines = render_status(partial, events=1).splitlines()
    start = lines.index("recent events: last 1, oldest first")
    assert lines[start - 1] == (
        "(the shared store is unavailable (rollout_events_unavailable): only the asked "
        "replica's own decisions are listed)")


def test_an_empty_picture_says_so() -> None:
    text = render_status({"regions": [], "blocked": [], "rollbacks": {}, "events": []})
    assert text.splitlines()[0] == "no region has a rollout state yet"
    assert "blocked    (none)" in text
    assert text.endswith("recent events: none\n")
