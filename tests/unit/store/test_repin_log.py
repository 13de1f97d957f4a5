"""The repin log's pure step: what a replica applies when it reads the log again."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st
from redis.exceptions import ResponseError

from proxy.store.redis_sync import LogPosition, LogStep, log_entry, log_position, next_step


def entries(*sessions: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    return [(f"{n}-0".encode(), log_entry(s)) for n, s in enumerate(sessions, start=1)]


def test_the_first_reading_is_only_a_baseline() -> None:
    now = LogPosition(7, b"7-0")
    assert next_step(None, now, 7, entries("a")) == LogStep(now)


def test_entries_added_since_the_last_position_are_evicted_in_order() -> None:
    known, now = LogPosition(5, b"5-0"), LogPosition(7, b"7-0")
    assert next_step(known, now, 7, entries("a", "\udcff")) == LogStep(now, evict=("a", "\udcff"))


def test_nothing_new_evicts_nothing() -> None:
    known = LogPosition(5, b"5-0")
    assert next_step(known, known, 5, []) == LogStep(known)


def test_a_log_trimmed_past_the_position_drops_the_cache() -> None:
    # 300 entries added since, but the capped stream only holds the newest 120.
    known, now = LogPosition(100, b"100-0"), LogPosition(400, b"400-0")
    step = next_step(known, now, 120, entries(*["s"] * 120))
    assert step.clear
    assert not step.evict
    assert step.position == now


def test_fewer_entries_read_than_were_added_drops_the_cache() -> None:
    known, now = LogPosition(5, b"5-0"), LogPosition(8, b"8-0")
    assert next_step(known, now, 8, entries("a", "b")).clear


def test_a_log_that_went_backwards_means_the_store_lost_data() -> None:
    known, now = LogPosition(50, b"50-0"), LogPosition(2, b"2-0")
    step = next_step(known, now, 2, entries("a", "b"))
    assert step.regressed
    assert step.position == now


def test_an_entry_that_is_not_ours_drops_the_cache() -> None:
    known, now = LogPosition(1, b"1-0"), LogPosition(2, b"2-0")
    assert next_step(known, now, 2, [(b"2-0", {b"other": b"x"})]).clear


def test_log_position_reads_xinfo_and_treats_a_missing_log_as_empty() -> None:
    info = {"length": 3, "entries-added": 9, "last-generated-id": b"9-0"}
    assert log_position(info) == (LogPosition(9, b"9-0"), 3)
    assert log_position(ResponseError("no such key")) == (LogPosition(0, None), 0)


@given(
    known_added=st.integers(0, 1000),
    added_since=st.integers(-50, 1000),
    kept=st.integers(0, 1000),
)
@example(known_added=10, added_since=5, kept=5)  # exactly what the log still holds
@example(known_added=10, added_since=6, kept=5)  # one entry trimmed unseen
def test_a_step_never_skips_an_entry_silently(
    known_added: int, added_since: int, kept: int
) -> None:
    now_added = max(0, known_added + added_since)
    length = min(kept, now_added)
    missed = now_added - known_added
    visible = entries(*[f"s{n}" for n in range(min(length, max(missed, 0)))])
    step = next_step(LogPosition(known_added, b"1-0"), LogPosition(now_added, b"2-0"),
                     length, visible)
    if missed > 0:
        # Either every missed entry is evicted, or the whole cache goes.
        assert step.clear or len(step.evict) == missed
    if missed < 0:
        assert step.regressed
