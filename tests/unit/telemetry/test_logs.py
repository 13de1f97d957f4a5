"""Log formats: a batch of request log lines is exactly what logging makes of records.

The request log is a line sink that writes its lines in batches (``format_request_lines``,
one write per batch) instead of one logging record per line; these tests pin that both
give the same text, that the JSON and text lines are still the ones the formats always
made, and that ``configure_logging`` sends them to stderr beside the log.
"""

from __future__ import annotations

import io
import logging
import random
import time
import tracemalloc
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.config.observability import LogConfig
from proxy.core.events import RequestEvent, Usage
from proxy.telemetry.logs import JsonFormatter, TextFormatter, configure_logging
from proxy.telemetry.requestlog import (
    LOGGER_NAME,
    LineSink,
    RequestLog,
    SessionHasher,
    event_fields,
    line_fields,
    route_request_log,
)

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from proxy.telemetry.requestlog import Taken

# Around second and millisecond boundaries, where rounding decides the printed time.
EDGES = [1_764_000_000.0, 1_764_000_000.0005, 1_764_000_000.9995, 1_764_000_000.9999995,
         1_764_000_000.9999994, 1_764_000_000.999999, 1_764_000_001.0000005, 0.0, 0.5,
         86_399.9999996, 1_700_000_000.123456, 1_700_000_000.0015, 4_102_444_799.999]


def _timestamps() -> list[float]:
    rng = random.Random(47)
    spread = [rng.uniform(0, 4_102_444_800) for _ in range(3000)]
    near_now = [1_764_000_000 + rng.random() * 86_400 for _ in range(3000)]
    return EDGES + spread + near_now


def _fields(i: int) -> dict[str, object]:
    return {"request_id": f"r-{i}", "session": None if i % 3 else "ab12", "status": 200 + i,
            "path": "/with space" if i % 5 == 0 else "/v1/chat/completions",
            "empty": "", "streamed": i % 2 == 0, "duration_ms": 12.3456 + i,
            "ratio": 1e-7 * i, "tokens": None, "new_pin": i % 4 == 0}


def _record(created: float, fields: Mapping[str, object]) -> logging.LogRecord:
    """The record the request log made per line before it wrote batches."""
    record = logging.LogRecord(LOGGER_NAME, logging.INFO, __file__, 0, "request", (), None)
    record.fields = fields
    record.created = created
    record.msecs = (created * 1000) % 1000
    return record


def _old_text(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    return text if text and " " not in text else repr(text)


@pytest.mark.parametrize("worker", [None, 3])
def test_json_lines_are_the_records_lines_and_the_format_is_unchanged(worker: int | None) -> None:
    formatter = JsonFormatter(worker)
    lines = [(created, _fields(i)) for i, created in enumerate(_timestamps())]
    batch = [formatter.format(_record(created, f)) for created, f in lines]
    for (created, fields), line in zip(lines, batch, strict=True):
        head: dict[str, object] = {
            "time": datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds"),
            "level": "info", "logger": LOGGER_NAME, "message": "request",
        }
        if worker is not None:
            head["worker"] = worker
        assert line == orjson.dumps({**head, **fields}).decode()


def test_json_fields_never_replace_the_head() -> None:
    formatter = JsonFormatter(1)
    fields = {"level": "nope", "a": 1, "time": "t", "exception": "x", "worker": 9}
    line = formatter.format(_record(1.5, fields))
    assert orjson.loads(line) == {"time": "1970-01-01T00:00:01.500+00:00", "level": "info",
                                  "logger": LOGGER_NAME, "message": "request", "worker": 1,
                                  "a": 1}


@pytest.mark.parametrize("worker", [None, 0])
def test_text_lines_are_the_records_lines_and_the_format_is_unchanged(
    worker: int | None,
) -> None:
    formatter = TextFormatter(worker)
    tag = f"[w{worker}] " if worker is not None else ""
    reference = logging.Formatter(f"%(asctime)s %(levelname)-7s {tag}%(name)s: %(message)s")
    lines = [(created, _fields(i)) for i, created in enumerate(_timestamps())]
    lines.append((1_764_000_000.25, {}))
    batch = [formatter.format(_record(created, f)) for created, f in lines]
    for (created, fields), line in zip(lines, batch, strict=True):
        expected = reference.format(_record(created, fields))
        pairs = " ".join(f"{k}={_old_text(v)}" for k, v in fields.items() if v is not None)
        assert line == (f"{expected} {pairs}" if fields else expected)
    assert batch[0].endswith(
        "INFO    " + tag + "pinproxy.requests: request request_id=r-0 session=ab12 "
        "status=200 path='/with space' empty='' streamed=yes duration_ms=12.3456 ratio=0 "
        "new_pin=yes"
    )
    assert batch[0].startswith(time.strftime("%Y-%m-%d %H:%M:%S,000 ",
                                             time.localtime(1_764_000_000.0)))


def _event(i: int, session: str | None = "alice") -> RequestEvent:
    return RequestEvent(
        at=1_764_000_000.0 + i, request_id=f"req-{i}", trace_id="ab" * 16,
        session_id=session, method="POST", path="/v1/chat/completions", status=200,
        backend_id="us-east-1", region="us-east", version_key="prompt=v47",
        new_pin=i == 0, version_changed=None, duration_s=0.0125, ttfb_s=0.002,
        error_type=None, streamed=True, usage=Usage(12, 4),
    )


def _lines_of(events: list[RequestEvent], hasher: SessionHasher,
              formatter: logging.Formatter) -> list[str]:
    """What the formatter makes of a record per event: the lines the log must write."""
    return [formatter.format(_record(e.at + e.duration_s, event_fields(e, hasher)))
            for e in events]


@pytest.mark.parametrize("formatter", [JsonFormatter(2), TextFormatter(2)])
def test_the_sinks_lines_are_the_formatters_lines_of_records(
    formatter: JsonFormatter | TextFormatter,
) -> None:
    stream = io.StringIO()
    hasher = SessionHasher(b"key")
    request_log = RequestLog(hasher, sink=LineSink(stream, formatter))
    events = [_event(i, None if i == 3 else "alice") for i in range(600)]  # > one write
    for event in events:
        request_log.observe(event)
    request_log.flush()
    assert stream.getvalue().splitlines() == _lines_of(events, hasher, formatter)
    assert "alice" not in stream.getvalue()


@pytest.fixture
def restored_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield
    root.handlers[:], level = saved
    root.setLevel(level)
    route_request_log(None)


@pytest.mark.parametrize(("log_format", "formatter"), [
    ("json", JsonFormatter(1)), ("text", TextFormatter(1))])
def test_configure_logging_sends_request_lines_to_stderr_in_the_log_format(
    restored_logging: None, capsys: pytest.CaptureFixture[str], log_format: str,
    formatter: logging.Formatter,
) -> None:
    configure_logging(LogConfig(format=log_format, level="error"), worker=1)
    hasher = SessionHasher(b"key")
    request_log = RequestLog(hasher)  # the process's sink
    events = [_event(i) for i in range(3)]
    for event in events:
        request_log.observe(event)
    request_log.flush()
    # Whatever the diagnostic level: the request log is an access log.
    assert capsys.readouterr().err.splitlines() == _lines_of(events, hasher, formatter)


def test_no_request_lines_when_the_request_log_is_off(
    restored_logging: None, capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging(LogConfig(request_log=False))
    request_log = RequestLog(SessionHasher(b"key"))
    request_log.observe(_event(0))
    request_log.flush()
    assert capsys.readouterr().err == ""
    assert "pending=0" in repr(request_log)  # dropped, not kept for later


def test_a_broken_stream_loses_its_lines_counted_and_reported_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError("pipe gone")

    sink = LineSink(Broken(), JsonFormatter(None))
    request_log = RequestLog(SessionHasher(b"key"), sink=sink)
    with caplog.at_level(logging.ERROR):
        for i in range(2):
            request_log.observe(_event(i))
            request_log.flush()  # does not raise
    assert sink.failures == 2
    assert [r.getMessage() for r in caplog.records] == [
        "request log lines cannot be written (OSError('pipe gone')); they are dropped"]


def test_the_session_hash_is_the_keyed_blake2b_and_its_memo_stays_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import hashlib

    from proxy.telemetry import requestlog

    monkeypatch.setattr(requestlog, "_CACHED_HASHES", 4)
    hasher = SessionHasher(b"k3y")

    def keyed(session_id: str) -> str:
        return hashlib.blake2b(session_id.encode(), key=b"k3y", digest_size=8).hexdigest()

    ids = [f"s{i}" for i in range(10)] * 2  # every id twice: once hashed, once remembered
    assert [hasher(sid) for sid in ids] == [keyed(sid) for sid in ids]
    assert len(hasher._cache) <= 4
    assert SessionHasher(b"other")("s1") != hasher("s1")
    assert SessionHasher(None, raw=True)("s1") == "s1"
    assert hasher(None) is None


def test_queued_lines_do_not_keep_request_bodies_alive() -> None:
    # A stalled log pipe keeps up to max_pending lines queued: each must cost its
    # fields, not its request's body (which the event carries for tracing).
    stream = io.StringIO()
    request_log = RequestLog(SessionHasher(b"key"), sink=LineSink(stream, TextFormatter(None)))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(200):
            request_log.observe(RequestEvent(
                at=1.0, request_id=f"r{i}", trace_id="t", session_id=f"s{i}", method="POST",
                path="/v1/chat/completions", status=200, backend_id="b", region="r",
                version_key="v1", new_pin=False, version_changed=None, duration_s=0.01,
                ttfb_s=None, error_type=None, request_body=bytes(100_000) + str(i).encode(),
            ))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 2_000_000  # 200 bodies of 100 kB would be 20 MB
    request_log.flush()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 200
    assert "request_id=r199" in lines[-1]


# -- format_request_lines: the request log's lines straight from its queued tuples ------

_texts = st.text(max_size=12)
_maybe = st.none() | _texts
# Every float, infinities and NaN too: a line's duration is what the clock said.
_seconds = st.floats(allow_subnormal=True)
_ORJSON_INTS = st.integers(-(2**63), 2**64 - 1)  # what orjson writes; it refuses others


def _taken(
    when: float = 1_764_000_000.25, request_id: str = "r-1", trace_id: str = "ab" * 16,
    session_id: str | None = "alice", client: str | None = "10.0.0.1",
    duration_s: float = 0.0123456, ttfb_s: float | None = 0.002,
    usage: Usage | None = Usage(12, 4), method: str = "POST",  # noqa: B008 - frozen
    path: str = "/v1/chat/completions", status: int = 200,
    version_key: str | None = "prompt=v47,parser=json-v2", region: str | None = "us-east",
    backend_id: str | None = "us-east-1", new_pin: bool = False,
    version_changed: str | None = None, structured_output_valid: bool | None = None,
    streamed: bool = True, error_type: str | None = None,
) -> Taken:
    """A queued line, in ``Taken``'s order (what ``_take`` makes of an event)."""
    return (when, request_id, trace_id, session_id, client, duration_s, ttfb_s, usage,
            method, path, status, version_key, region, backend_id, new_pin,
            version_changed, structured_output_valid, streamed, error_type)


def _taken_lines(ints: st.SearchStrategy[int]) -> st.SearchStrategy[list[Taken]]:
    one = st.builds(
        _taken, when=st.floats(0, 4_102_444_800) | st.sampled_from(EDGES),
        request_id=_texts, trace_id=_texts, session_id=_maybe, client=_maybe,
        duration_s=_seconds, ttfb_s=st.none() | _seconds,
        usage=st.none() | st.builds(Usage, ints, ints), method=_texts, path=_texts,
        status=ints, version_key=_maybe, region=_maybe, backend_id=_maybe,
        new_pin=st.booleans(), version_changed=_maybe,
        structured_output_valid=st.none() | st.booleans(), streamed=st.booleans(),
        error_type=_maybe,
    )
    # Several lines, and more made of them: each of the first's with one value of the
    # last's (a remembered run must tell them apart by every value it is made of), the
    # first two again 0.4 ms later (the second the formatters remember comes back).
    def more(lines: list[Taken]) -> st.SearchStrategy[list[Taken]]:
        first, last = lines[0], lines[-1]
        mixed = [(*first[:i], last[i], *first[i + 1:]) for i in range(len(first))]
        again = [(line[0] + 0.0004, *line[1:]) for line in lines[:2]]
        return st.permutations(lines + mixed + again)  # type: ignore[arg-type]

    return st.lists(one, min_size=1, max_size=4).flatmap(more)


# Values at the edges of each field's formatting: None everywhere; spaces, quotes,
# backslashes, control and non-ASCII characters, empty strings; floats that print in
# exponent form, negative zero, infinities, NaN, halfway cases of round(x, 3); bools;
# ints at orjson's limits (text: beyond them); times at second and ms boundaries.
_EDGE_LINES = [
    [_taken(session_id=None, client=None, ttfb_s=None, usage=None, version_key=None,
            region=None, backend_id=None, version_changed=None,
            structured_output_valid=None, error_type=None)],
    [_taken(request_id="a b", trace_id="", session_id="it's \"x\"", client="é ü",
            method="", path="/with space", version_key="parser=json", region='"q"',
            backend_id="back\\slash", version_changed="prompt=v46 -> prompt=v47",
            error_type="\x00\n\t\x7f\u2028", structured_output_valid=True, new_pin=True)],
    [_taken(duration_s=1e-10, ttfb_s=-0.0), _taken(duration_s=-0.0, ttfb_s=1e-7),
     _taken(duration_s=1e13, ttfb_s=5e-7), _taken(duration_s=2.675e-3, ttfb_s=1.0005e-3),
     _taken(duration_s=float("inf"), ttfb_s=float("nan")),
     _taken(duration_s=-1e-7, ttfb_s=float("-inf"), structured_output_valid=False)],
    [_taken(usage=Usage(2**64 - 1, -(2**63)), status=0)],
    [_taken(when=when) for when in EDGES],
]


@pytest.mark.parametrize("worker", [None, 7])
@given(lines=_taken_lines(_ORJSON_INTS), raw=st.booleans())
@settings(max_examples=300, deadline=None)
@example(lines=_EDGE_LINES[0], raw=False)
@example(lines=_EDGE_LINES[1], raw=True)
@example(lines=_EDGE_LINES[2], raw=False)
@example(lines=_EDGE_LINES[3], raw=False)
@example(lines=_EDGE_LINES[4], raw=False)
def test_json_request_lines_are_the_records_lines(
    worker: int | None, lines: list[Taken], raw: bool,
) -> None:
    hasher = SessionHasher(b"key", raw=raw)
    formatter = JsonFormatter(worker)
    expected = "".join(formatter.format(_record(t[0], line_fields(t, hasher))) + "\n"
                       for t in lines)
    for _ in range(2):  # the second time from what the formatter remembered
        assert formatter.format_request_lines(
            LOGGER_NAME, logging.INFO, "request", lines, hasher) == expected


@pytest.mark.parametrize("worker", [None, 7])
@given(lines=_taken_lines(st.integers()), raw=st.booleans())
@settings(max_examples=300, deadline=None)
@example(lines=_EDGE_LINES[0], raw=False)
@example(lines=_EDGE_LINES[1], raw=True)
@example(lines=_EDGE_LINES[2], raw=False)
@example(lines=[_taken(usage=Usage(10**30, -(10**30)), status=-(2**70))], raw=False)
@example(lines=_EDGE_LINES[4], raw=False)
def test_text_request_lines_are_the_records_lines(
    worker: int | None, lines: list[Taken], raw: bool,
) -> None:
    hasher = SessionHasher(b"key", raw=raw)
    formatter = TextFormatter(worker)
    expected = "".join(formatter.format(_record(t[0], line_fields(t, hasher))) + "\n"
                       for t in lines)
    for _ in range(2):
        assert formatter.format_request_lines(
            LOGGER_NAME, logging.INFO, "request", lines, hasher) == expected


def test_json_request_lines_refuse_what_orjson_refuses() -> None:
    # An int beyond 64 bits: the records' lines fail as the batch does, nothing half-made.
    [line] = [_taken(usage=Usage(2**64, 1))]
    hasher = SessionHasher(b"key")
    formatter = JsonFormatter(None)
    with pytest.raises(orjson.JSONEncodeError):
        formatter.format(_record(line[0], line_fields(line, hasher)))
    with pytest.raises(orjson.JSONEncodeError):
        formatter.format_request_lines(LOGGER_NAME, logging.INFO, "request", [line], hasher)


def test_remembered_runs_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.telemetry import logs

    monkeypatch.setattr(logs, "_REMEMBERED_RUNS", 3)
    hasher = SessionHasher(b"key")
    lines = [_taken(path=f"/p{i}") for i in range(10)]
    for formatter in (JsonFormatter(None), TextFormatter(None)):
        expected = "".join(formatter.format(_record(t[0], line_fields(t, hasher))) + "\n"
                           for t in lines)
        assert formatter.format_request_lines(
            LOGGER_NAME, logging.INFO, "request", lines, hasher) == expected
        assert len(formatter._runs) <= 3
