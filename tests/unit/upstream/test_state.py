"""The upstream pool's decisions (proxy/upstream/state.py), for every combination of facts.

Each property is one promise of the client's theory of operation, stated over all
inputs hypothesis draws rather than the few a socket test can stage.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.upstream.state import (
    ConnState,
    IdleVerdict,
    Lost,
    idle_verdict,
    keep_alive_of,
    lost,
    may_replay,
    reusable,
)

STATES = st.sampled_from(ConnState)
SECONDS = st.floats(min_value=0, max_value=1e6, allow_nan=False)


@given(state=STATES, keep_alive=st.booleans(), request_sent=st.booleans(),
       unread=st.booleans())
def test_a_connection_is_reused_only_after_a_whole_clean_exchange(
    state: ConnState, keep_alive: bool, request_sent: bool, unread: bool
) -> None:
    reuse = reusable(state, keep_alive=keep_alive, request_sent=request_sent, unread=unread)
    clean = state is ConnState.COMPLETE and keep_alive and request_sent and not unread
    assert reuse == clean


@given(replayable=st.booleans(), streamed=st.booleans(), reused=st.booleans(),
       got_bytes=st.booleans())
def test_a_request_is_written_again_only_when_nothing_can_have_answered_it_twice(
    replayable: bool, streamed: bool, reused: bool, got_bytes: bool
) -> None:
    replay = may_replay(replayable=replayable, streamed=streamed, reused=reused,
                        got_bytes=got_bytes)
    if replay:
        # idempotent (or keyed), a held body, a connection the backend had likely closed
        # while idle, and not one byte of an answer
        assert replayable
        assert not streamed
        assert reused
        assert not got_bytes
    else:
        assert not replayable or streamed or not reused or got_bytes


@given(usable=st.booleans(), age=SECONDS, keepalive=SECONDS, quiet=SECONDS)
def test_an_idle_connection_is_lent_only_when_quiet_long_enough_and_not_too_old(
    usable: bool, age: float, keepalive: float, quiet: float
) -> None:
    verdict = idle_verdict(usable=usable, age_s=age, keepalive_s=keepalive, quiet_s=quiet)
    if verdict is IdleVerdict.LEND:
        assert usable
        assert quiet <= age < keepalive
    elif verdict is IdleVerdict.TOO_YOUNG:
        # kept for later: a younger one is younger still, so the search stops here
        assert usable
        assert age < quiet
        assert age < keepalive
    else:
        assert not usable or age >= keepalive


@given(age=SECONDS, keepalive=SECONDS, quiet=SECONDS, later=st.floats(0, 1e3))
def test_an_idle_connection_once_lendable_stays_so_until_its_keepalive_ends(
    age: float, keepalive: float, quiet: float, later: float
) -> None:
    def verdict(at: float) -> IdleVerdict:
        return idle_verdict(usable=True, age_s=at, keepalive_s=keepalive, quiet_s=quiet)

    if verdict(age) is IdleVerdict.LEND and age + later < keepalive:
        assert verdict(age + later) is IdleVerdict.LEND
    if verdict(age) is IdleVerdict.DISCARD:
        assert verdict(age + later) is IdleVerdict.DISCARD  # never revived


@given(state=STATES, until_eof=st.booleans(), clean=st.booleans())
def test_a_lost_connection_completes_a_response_only_when_its_end_was_the_framing(
    state: ConnState, until_eof: bool, clean: bool
) -> None:
    verdict = lost(state, until_eof=until_eof, clean=clean)
    if verdict is Lost.COMPLETES:
        assert state is ConnState.READING_BODY
        assert until_eof
        assert clean
    elif verdict is Lost.DROPPED:
        assert state is ConnState.AWAITING_HEAD  # written, unanswered: maybe acted on
    elif verdict is Lost.BODY_BROKEN:
        assert state is ConnState.READING_BODY
        assert not (until_eof and clean)
    else:
        assert state in (ConnState.IDLE, ConnState.COMPLETE)


TOKENS = st.lists(st.sampled_from(["close", "keep-alive", "Keep-Alive", "CLOSE", "upgrade",
                                   " te "]), max_size=4)


@given(version=st.sampled_from(["1.0", "1.1"]), tokens=TOKENS)
def test_keep_alive_follows_the_version_and_the_connection_header(
    version: str, tokens: list[str]
) -> None:
    header = ",".join(tokens) if tokens else None
    named = {t.strip().lower() for t in tokens}
    expected = "close" not in named and (version == "1.1" or "keep-alive" in named)
    assert keep_alive_of(version, header) is expected
