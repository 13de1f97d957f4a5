"""Log formats: a batch of request log lines is exactly what logging makes of records.

The request log writes its lines in batches (``format_lines``, one write per batch)
instead of one logging record per line; these tests pin that both give the same text,
and that the JSON and text lines are still the ones the formats always made.
"""

from __future__ import annotations

import io
import logging
import random
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import orjson
import pytest

from proxy.core.events import RequestEvent, Usage
from proxy.telemetry.logs import JsonFormatter, TextFormatter
from proxy.telemetry.requestlog import LOGGER_NAME, RequestLog, SessionHasher, event_fields

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

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
    batch = formatter.format_lines(LOGGER_NAME, logging.INFO, "request", lines)
    assert batch == [formatter.format(_record(created, f)) for created, f in lines]
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
    [line] = formatter.format_lines(LOGGER_NAME, logging.INFO, "request", [(1.5, fields)])
    assert line == formatter.format(_record(1.5, fields))
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
    batch = formatter.format_lines(LOGGER_NAME, logging.INFO, "request", lines)
    assert batch == [formatter.format(_record(created, f)) for created, f in lines]
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


class Captured(logging.Handler):
    """A handler that is not a plain StreamHandler: it gets one record per line."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def request_logger() -> Iterator[logging.Logger]:
    logger = logging.getLogger(LOGGER_NAME)
    saved = logger.handlers[:], logger.level, logger.propagate, logger.filters[:]
    logger.handlers[:] = []
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger
    logger.handlers[:], level, logger.propagate, logger.filters[:] = saved
    logger.setLevel(level)


@pytest.mark.parametrize("formatter", [JsonFormatter(2), TextFormatter(2)])
def test_written_in_batches_or_as_records_the_lines_are_the_same(
    request_logger: logging.Logger, formatter: logging.Formatter,
) -> None:
    fast, plain = io.StringIO(), io.StringIO()
    batched = logging.StreamHandler(fast)

    class Subclassed(logging.StreamHandler[io.StringIO]):  # not batched: any subclass
        pass

    per_record = Subclassed(plain)
    captured = Captured()
    for handler in (batched, per_record, captured):
        handler.setFormatter(formatter)
        request_logger.addHandler(handler)
    hasher = SessionHasher(b"key")
    request_log = RequestLog(hasher)
    events = [_event(i, None if i == 3 else "alice") for i in range(600)]  # > one write
    for event in events:
        request_log.observe(event)
    request_log.flush()
    lines = fast.getvalue().splitlines()
    assert len(lines) == 600
    assert lines == plain.getvalue().splitlines()
    assert lines == [formatter.format(record) for record in captured.records]
    assert [r.fields for r in captured.records] == [  # type: ignore[attr-defined]
        event_fields(e, hasher) for e in events]
    assert [r.created for r in captured.records] == [e.at + e.duration_s for e in events]
    assert "alice" not in fast.getvalue()


def test_a_logger_filter_still_applies(request_logger: logging.Logger) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(None))
    request_logger.addHandler(handler)
    request_logger.addFilter(lambda record: record.fields["request_id"] != "req-1")  # type: ignore[attr-defined]
    request_log = RequestLog(SessionHasher(b"key"))
    for i in range(3):
        request_log.observe(_event(i))
    request_log.flush()
    assert [orjson.loads(line)["request_id"] for line in stream.getvalue().splitlines()] == [
        "req-0", "req-2"]


def test_propagates_to_the_root_handlers_unless_told_not_to(
    request_logger: logging.Logger,
) -> None:
    root, own = io.StringIO(), io.StringIO()
    root_handler, own_handler = logging.StreamHandler(root), logging.StreamHandler(own)
    quiet = logging.StreamHandler(io.StringIO())
    quiet.setLevel(logging.WARNING)
    for handler in (root_handler, own_handler, quiet):
        handler.setFormatter(TextFormatter(None))
    logging.getLogger().addHandler(root_handler)
    request_logger.addHandler(own_handler)
    request_logger.addHandler(quiet)
    request_log = RequestLog(SessionHasher(b"key"))
    try:
        request_logger.propagate = True
        request_log.observe(_event(0))
        request_log.flush()
        request_logger.propagate = False
        request_log.observe(_event(1))
        request_log.flush()
    finally:
        logging.getLogger().removeHandler(root_handler)
    assert root.getvalue().count("\n") == 1
    assert own.getvalue().count("\n") == 2
    assert quiet.stream.getvalue() == ""


def test_a_broken_stream_is_reported_like_logging_does(
    request_logger: logging.Logger, capsys: pytest.CaptureFixture[str],
) -> None:
    class Broken(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError("pipe gone")

    handler = logging.StreamHandler(Broken())
    handler.setFormatter(JsonFormatter(None))
    request_logger.addHandler(handler)
    request_log = RequestLog(SessionHasher(b"key"))
    request_log.observe(_event(0))
    request_log.flush()  # does not raise: the handler reports the error
    assert "pipe gone" in capsys.readouterr().err
