"""Logging set-up: a readable text format for people, JSON lines for collectors.

A record may carry structured ``fields`` (a dict, passed as ``extra={"fields": ...}``;
the request log does): the JSON format puts them at the top level of the line, the
text format appends them as ``key=value`` pairs.

Both formatters also format the request log's lines many at once
(``format_request_lines``), the same lines ``format`` would make of a record per line:
the request log, a line sink of its own rather than a logger, writes its lines in
batches, made straight from its queued tuples rather than from a dict of fields per
line (see requestlog.py). Both
remember the text of the runs of fields that repeat from request to request (method to
version_changed, structured_output_valid to error_type), made by the same code as
``format``'s, and format only the rest per line: the text one as pairs, the JSON one
as one ``orjson.dumps`` of a dozen entries, each run an ``orjson.Fragment`` of JSON
already written.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final, final

import orjson

from proxy.telemetry.requestlog import (
    REPEATING,
    REPEATING_RUNS,
    LineSink,
    line_fields,
    route_request_log,
)

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from proxy.config.observability import LogConfig
    from proxy.telemetry.requestlog import SessionHasher, Taken

# Keys a record's own fields may not replace in a JSON line.
_RESERVED: Final = frozenset({"time", "level", "logger", "message", "worker", "exception"})


@final  # format_request_lines must stay the batch form of format: no subclass may change one
class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ms), level, logger, message, fields."""

    def __init__(self, worker: int | None) -> None:
        super().__init__()
        self._worker = worker
        # The line's time to the second, for the last second seen: formatting a datetime
        # per line would cost about as much as all the rest of a request log line.
        self._second: tuple[int, str] = (-1, "")
        # The JSON members of the request log's runs of fields that repeat across
        # requests, by the queued values they are made of (format_request_lines).
        self._runs: dict[tuple[object, ...], tuple[orjson.Fragment, orjson.Fragment]] = {}

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self._utc_time(record.created),
            **self._head(record.levelname, record.name, record.getMessage()),
        }
        fields: Mapping[str, object] | None = getattr(record, "fields", None)
        if fields:
            for key, value in fields.items():
                if key not in _RESERVED:
                    entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()

    def format_request_lines(
        self, name: str, levelno: int, message: str, lines: Sequence[Taken],
        hasher: SessionHasher,
    ) -> str:
        """``format`` of a record per queued line (``line_fields``), as one text."""
        # Each line is one dumps of a dict of a dozen entries rather than of the 25 the
        # line has: a run of members that is the same from line to line (the head after
        # the time; method to version_changed; structured_output_valid to error_type)
        # is one entry, its first member's key with a Fragment holding that member's
        # value and the members after it, as orjson wrote them (_run_json). orjson
        # writes a Fragment as it is and an object as its members joined by commas, so
        # the line is byte for byte the dumps of the whole object, and no line needs a
        # dict of all its fields (building one cost more than the dumps).
        head_key, head = _run_json(self._head(logging.getLevelName(levelno), name, message))
        middle_key, tail_key = REPEATING_RUNS[0][0], REPEATING_RUNS[1][0]
        utc_time = self._utc_time
        dumps = orjson.dumps
        modf = math.modf
        runs = self._runs
        hashes = hasher.remembered.get
        second, second_text = -1.0, ""  # _utc_time's second, as a float, and its text
        out = []
        for taken in lines:
            when, request_id, trace_id, session_id, client, duration_s, ttfb_s, usage = (
                taken[:8])
            # _utc_time inline for a line in the second before's: the same rounding.
            fraction, whole = modf(when)
            micros = round(fraction * 1e6)
            if whole == second and 0 <= micros < 1_000_000:
                stamp = second_text + _ISO_MS[micros // 1000]
            else:
                stamp = utc_time(when)
                cached, second_text = self._second
                second = float(cached)
            known = runs.get(taken[REPEATING:])
            middle, tail = known if known is not None else self._remember(taken, hasher)
            out.append(dumps({
                "time": stamp,
                head_key: head,
                "request_id": request_id,
                "trace_id": trace_id,
                "session": hashes(session_id) or hasher(session_id),  # type: ignore[arg-type]
                "client": client,
                middle_key: middle,
                "duration_ms": round(duration_s * 1000, 3),
                "ttfb_ms": None if ttfb_s is None else round(ttfb_s * 1000, 3),
                "prompt_tokens": None if usage is None else usage.prompt_tokens,
                "completion_tokens": None if usage is None else usage.completion_tokens,
                tail_key: tail,
            }))
        out.append(b"")  # the last line's newline
        return b"\n".join(out).decode()

    def _remember(
        self, taken: Taken, hasher: SessionHasher
    ) -> tuple[orjson.Fragment, orjson.Fragment]:
        """``taken``'s two runs of fields as ``_run_json`` Fragments, made from its
        fields, remembered."""
        runs = self._runs
        if len(runs) >= _REMEMBERED_RUNS:
            runs.clear()
        line = line_fields(taken, hasher)
        middle, tail = ({key: line[key] for key in run} for run in REPEATING_RUNS)
        known = runs[taken[REPEATING:]] = (_run_json(middle)[1], _run_json(tail)[1])
        return known

    def _head(self, levelname: str, name: str, message: str) -> dict[str, object]:
        """What follows the time in every line."""
        head: dict[str, object] = {"level": levelname.lower(), "logger": name, "message": message}
        if self._worker is not None:
            head["worker"] = self._worker
        return head

    def _utc_time(self, created: float) -> str:
        """``datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")``."""
        # Rounded to the microsecond the way datetime.fromtimestamp does it (half to even,
        # carried into the second), then truncated to ms as isoformat does.
        fraction, whole = math.modf(created)
        micros = round(fraction * 1e6)
        if micros >= 1_000_000:
            micros -= 1_000_000
            whole += 1.0
        elif micros < 0:
            micros += 1_000_000
            whole -= 1.0
        second = int(whole)
        cached, text = self._second
        if second != cached:
            moment = datetime.fromtimestamp(second, UTC).replace(tzinfo=None)
            text = moment.isoformat(timespec="seconds")
            self._second = (second, text)
        return f"{text}.{micros // 1000:03d}+00:00"

    def __repr__(self) -> str:
        return f"JsonFormatter(worker={self._worker})"


@final  # format_request_lines must stay the batch form of format: no subclass may change one
class TextFormatter(logging.Formatter):
    """``time level [wN] logger: message key=value ...`` for people reading a terminal."""

    def __init__(self, worker: int | None) -> None:
        tag = f"[w{worker}] " if worker is not None else ""
        # The time leads, so a batch formats the rest of the head once (format_request_lines).
        self._after_time = f" %(levelname)-7s {tag}%(name)s: %(message)s"
        super().__init__("%(asctime)s" + self._after_time)
        self._worker = worker
        self._second: tuple[int, str] = (-1, "")  # the time to the second, for the last
        # The text of the request log's runs of fields that repeat across requests, by
        # the queued values they are made of (format_request_lines).
        self._runs: dict[tuple[object, ...], tuple[str, str]] = {}

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields: Mapping[str, object] | None = getattr(record, "fields", None)
        if not fields:
            return line
        return f"{line} {_pairs(fields)}"

    def format_request_lines(
        self, name: str, levelno: int, message: str, lines: Sequence[Taken],
        hasher: SessionHasher,
    ) -> str:
        """``format`` of a record per queued line (``line_fields``), as one text."""
        rest = self._after_time % {
            "levelname": logging.getLevelName(levelno), "name": name, "message": message,
        }
        asctime = self._asctime
        # _ASCTIME_MS is this format's milliseconds (logging's default), made ahead.
        table = self.default_msec_format == "%s,%03d"
        floor = math.floor
        runs = self._runs
        hashes = hasher.remembered.get
        out = []
        for taken in lines:
            when, request_id, trace_id, session_id, client, duration_s, ttfb_s, usage = (
                taken[:8])
            second, second_text = self._second
            # _asctime inline for a line in the second before's.
            msecs = int((when * 1000) % 1000)  # what %03d makes of the float
            if table and floor(when) == second and msecs < 1000:
                stamp = second_text + _ASCTIME_MS[msecs]
            else:
                stamp = asctime(when)
            known = runs.get(taken[REPEATING:])
            middle, tail = known if known is not None else self._remember(taken, hasher)
            # Each field as _pairs makes it, with the space before it ("" when left
            # out): the common type inline, any other by _pair.
            head = stamp + rest
            text = (" request_id=" + request_id if type(request_id) is str and request_id
                    and " " not in request_id else _pair(" request_id=", request_id))
            text2 = (" trace_id=" + trace_id if type(trace_id) is str and trace_id
                     and " " not in trace_id else _pair(" trace_id=", trace_id))
            session = hashes(session_id) or hasher(session_id)  # type: ignore[arg-type]
            text3 = (" session=" + session if type(session) is str and session
                     and " " not in session else _pair(" session=", session))
            text4 = (" client=" + client if type(client) is str and client
                     and " " not in client else _pair(" client=", client))
            ms = round(duration_s * 1000, 3)
            text5 = (f" duration_ms={ms:g}" if type(ms) is float
                     else _pair(" duration_ms=", ms))
            if ttfb_s is None:
                text6 = ""
            else:
                ms = round(ttfb_s * 1000, 3)
                text6 = (f" ttfb_ms={ms:g}" if type(ms) is float
                         else _pair(" ttfb_ms=", ms))
            if usage is None:
                text7 = ""
            else:
                tokens, tokens2 = usage.prompt_tokens, usage.completion_tokens
                text7 = (f" prompt_tokens={tokens}" if type(tokens) is int
                         else _pair(" prompt_tokens=", tokens)) + (
                    f" completion_tokens={tokens2}" if type(tokens2) is int
                    else _pair(" completion_tokens=", tokens2))
            # Never without a field (request_id is a str): format's line is head + " " +
            # the pairs, this one head + each pair with the space before it.
            out.append(f"{head}{text}{text2}{text3}{text4}{middle}{text5}{text6}{text7}{tail}")
        out.append("")  # the last line's newline
        return "\n".join(out)

    def _remember(self, taken: Taken, hasher: SessionHasher) -> tuple[str, str]:
        """The text of ``taken``'s two runs of fields, made from its fields as ``format``
        makes them, remembered."""
        runs = self._runs
        if len(runs) >= _REMEMBERED_RUNS:
            runs.clear()
        line = line_fields(taken, hasher)
        middle, tail = ({key: line[key] for key in run} for run in REPEATING_RUNS)
        # Each with the space before it, "" when the whole run is left out.
        known = runs[taken[REPEATING:]] = (_spaced(_pairs(middle)), _spaced(_pairs(tail)))
        return known

    def _asctime(self, created: float) -> str:
        """``formatTime`` of a record created at ``created`` (msecs as the request log sets
        them), with the strftime part done once per second."""
        second = math.floor(created)  # what the converter (localtime) does to a float
        cached, text = self._second
        if second != cached:
            text = time.strftime(self.default_time_format, self.converter(second))
            self._second = (second, text)
        if not self.default_msec_format:
            return text
        return self.default_msec_format % (text, (created * 1000) % 1000)

    def __repr__(self) -> str:
        return f"TextFormatter(worker={self._worker})"


# A time's milliseconds and what follows them, by ms: in JSON lines, and in text lines
# (logging's default_msec_format), made once rather than per line.
_ISO_MS: Final = tuple(f".{ms:03d}+00:00" for ms in range(1000))
_ASCTIME_MS: Final = tuple(f",{ms:03d}" for ms in range(1000))
# Runs remembered per formatter; cleared whole when full, a bound and nothing more.
_REMEMBERED_RUNS: Final = 4096


def _run_json(run: Mapping[str, object]) -> tuple[str, orjson.Fragment]:
    """``run``'s first key, and a Fragment of what follows it in ``orjson.dumps(run)``:
    the first value, then the other members. As that key's value in a dict, the
    Fragment writes the whole run."""
    first = next(iter(run))
    key = orjson.dumps({first: None})[:-len(b"null}")]  # {"first": (orjson: no spaces)
    text = orjson.dumps(run)
    return first, orjson.Fragment(text[len(key):-1])


def _pairs(fields: Mapping[str, object]) -> str:
    pairs = []
    for key, value in fields.items():
        text = _value(value)
        if text is not None:
            pairs.append(f"{key}={text}")
    return " ".join(pairs)


def _pair(key: str, value: object) -> str:
    """``key`` (`` name=``) and ``value`` as _pairs makes the pair; "" when left out."""
    text = _value(value)
    return "" if text is None else key + text


def _spaced(pairs: str) -> str:
    return " " + pairs if pairs else ""


def _value(value: object) -> str | None:
    """A field's value in a text line (None: the field is left out)."""
    # The common types first.
    if type(value) is str:
        return value if value and " " not in value else repr(value)
    if type(value) is int:
        return str(value)
    if value is None:
        return None
    if type(value) is bool:
        return "yes" if value else "no"
    if type(value) is float:
        return f"{value:g}"
    return _text(value)


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    return text if text and " " not in text else repr(text)


def set_log_level(config: LogConfig) -> None:
    """Apply ``log.level`` to diagnostic logging (a live reload; the request log keeps its own)."""
    logging.getLogger().setLevel(config.level.upper())


def configure_logging(config: LogConfig, worker: int | None = None) -> None:
    """Send every log record to stderr in the configured format, at the configured level."""
    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonFormatter(worker) if config.format == "json" else TextFormatter(worker)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_log_level(config)
    # The request log is an access log: ``log.request_log`` turns it on or off, whatever
    # the level of diagnostic logging. Its lines go to stderr beside the log's, in the
    # same format, under the handler's lock so that the two never interleave.
    route_request_log(
        LineSink(sys.stderr, formatter, handler.lock) if config.request_log else None
    )
