"""Logging set-up: a readable text format for people, JSON lines for collectors.

A record may carry structured ``fields`` (a dict, passed as ``extra={"fields": ...}``;
the request log does): the JSON format puts them at the top level of the line, the
text format appends them as ``key=value`` pairs.

Both formatters also format many lines of one logger at once (``format_lines``), the
same lines ``format`` would make of the records: the request log, a line sink of its
own rather than a logger, writes its lines in batches that way (see requestlog.py).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final, final

import orjson

from proxy.telemetry.requestlog import LineSink, route_request_log

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from proxy.config.observability import LogConfig

# Keys a record's own fields may not replace in a JSON line.
_RESERVED: Final = frozenset({"time", "level", "logger", "message", "worker", "exception"})


@final  # format_lines must stay the batch form of format: no subclass may change one
class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ms), level, logger, message, fields."""

    def __init__(self, worker: int | None) -> None:
        super().__init__()
        self._worker = worker
        # The line's time to the second, for the last second seen: formatting a datetime
        # per line would cost about as much as all the rest of a request log line.
        self._second: tuple[int, str] = (-1, "")

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

    def format_lines(
        self, name: str, levelno: int, message: str,
        lines: Sequence[tuple[float, Mapping[str, object]]],
    ) -> list[str]:
        """``format`` of a record per ``(created, fields)``, without the records."""
        head = self._head(logging.getLevelName(levelno), name, message)
        utc_time = self._utc_time
        out = []
        for created, fields in lines:
            entry = {"time": utc_time(created), **head}
            if _RESERVED.isdisjoint(fields):
                entry.update(fields)
            else:
                entry.update((k, v) for k, v in fields.items() if k not in _RESERVED)
            out.append(orjson.dumps(entry).decode())
        return out

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


@final  # format_lines must stay the batch form of format: no subclass may change one
class TextFormatter(logging.Formatter):
    """``time level [wN] logger: message key=value ...`` for people reading a terminal."""

    def __init__(self, worker: int | None) -> None:
        tag = f"[w{worker}] " if worker is not None else ""
        # The time leads, so a batch formats the rest of the head once (format_lines).
        self._after_time = f" %(levelname)-7s {tag}%(name)s: %(message)s"
        super().__init__("%(asctime)s" + self._after_time)
        self._worker = worker
        self._second: tuple[int, str] = (-1, "")  # the time to the second, for the last

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields: Mapping[str, object] | None = getattr(record, "fields", None)
        if not fields:
            return line
        return f"{line} {_pairs(fields)}"

    def format_lines(
        self, name: str, levelno: int, message: str,
        lines: Sequence[tuple[float, Mapping[str, object]]],
    ) -> list[str]:
        """``format`` of a record per ``(created, fields)``, without the records."""
        rest = self._after_time % {
            "levelname": logging.getLevelName(levelno), "name": name, "message": message,
        }
        out = []
        for created, fields in lines:
            line = self._asctime(created) + rest
            out.append(f"{line} {_pairs(fields)}" if fields else line)
        return out

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


def _pairs(fields: Mapping[str, object]) -> str:
    pairs = []
    for key, value in fields.items():
        # The common types first, inline: this runs for every field of every line.
        if type(value) is str:
            text = value if value and " " not in value else repr(value)
        elif type(value) is int:
            text = str(value)
        elif value is None:
            continue
        elif type(value) is bool:
            text = "yes" if value else "no"
        elif type(value) is float:
            text = f"{value:g}"
        else:
            text = _text(value)
        pairs.append(f"{key}={text}")
    return " ".join(pairs)


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
