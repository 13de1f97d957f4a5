"""Logging set-up: a readable text format for people, JSON lines for collectors.

A record may carry structured ``fields`` (a dict, passed as ``extra={"fields": ...}``;
the request log does): the JSON format puts them at the top level of the line, the
text format appends them as ``key=value`` pairs.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

import orjson

from proxy.requestlog import LOGGER_NAME as REQUEST_LOGGER

if TYPE_CHECKING:
    from collections.abc import Mapping

    from proxy.config import LogConfig

# Keys a record's own fields may not replace in a JSON line.
_RESERVED: Final = frozenset({"time", "level", "logger", "message", "worker", "exception"})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ms), level, logger, message, fields."""

    def __init__(self, worker: int | None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._worker is not None:
            entry["worker"] = self._worker
        fields: Mapping[str, object] | None = getattr(record, "fields", None)
        if fields:
            for key, value in fields.items():
                if key not in _RESERVED:
                    entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()

    def __repr__(self) -> str:
        return f"JsonFormatter(worker={self._worker})"


class TextFormatter(logging.Formatter):
    """``time level [wN] logger: message key=value ...`` for people reading a terminal."""

    def __init__(self, worker: int | None) -> None:
        tag = f"[w{worker}] " if worker is not None else ""
        super().__init__(f"%(asctime)s %(levelname)-7s {tag}%(name)s: %(message)s")
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields: Mapping[str, object] | None = getattr(record, "fields", None)
        if not fields:
            return line
        pairs = " ".join(f"{k}={_text(v)}" for k, v in fields.items() if v is not None)
        return f"{line} {pairs}"

    def __repr__(self) -> str:
        return f"TextFormatter(worker={self._worker})"


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    return text if text and " " not in text else repr(text)


def configure_logging(config: LogConfig, worker: int | None = None) -> None:
    """Send every log record to stderr in the configured format, at the configured level."""
    handler = logging.StreamHandler(sys.stderr)
    if config.format == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        handler.setFormatter(TextFormatter(worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level.upper())
    # The request log is an access log: ``log.request_log`` turns it on or off, whatever
    # the level of diagnostic logging.
    logging.getLogger(REQUEST_LOGGER).setLevel(
        logging.INFO if config.request_log else logging.WARNING
    )
