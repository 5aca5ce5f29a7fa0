"""Logging set-up for worker processes: one line per event, as text or JSON.

``text`` is for people at a terminal::

    2025-01-31T12:00:00.123Z INFO  client workers.client.worker: epoch done epoch=3 loss=0.41

``json`` is for log collectors (journald, Loki, Elasticsearch): one JSON object per line
with ``ts`` (ISO 8601, UTC), ``level``, ``logger``, ``role``, ``msg`` and every field
passed with ``extra=``; an exception adds ``exc``. Newlines inside a message are escaped
in the text format too, so one event is always one line.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

from sl_pipeline.errors import ConfigError

LogFormat = Literal["text", "json"]

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRS: frozenset[str] = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
) | {"message", "asctime", "taskName"}

_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _iso_ts(created: float) -> str:
    stamp = datetime.fromtimestamp(created, tz=UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS and k[:1] != "_"}


class _Formatter(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def _exc_text(self, record: logging.LogRecord) -> str | None:
        if record.exc_info:
            return self.formatException(record.exc_info)
        if record.stack_info:
            return self.formatStack(record.stack_info)
        return None


class JsonFormatter(_Formatter):
    """One JSON object per record, keys: ts, level, logger, role, msg, extras, exc."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "ts": _iso_ts(record.created),
            "level": record.levelname,
            "logger": record.name,
            "role": self.role,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            event.setdefault(key, value)
        exc = self._exc_text(record)
        if exc is not None:
            event["exc"] = exc
        return json.dumps(event, default=str, ensure_ascii=False)


class TextFormatter(_Formatter):
    """``TS LEVEL role logger: msg key=value ...`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        role = f" {self.role}" if self.role else ""
        parts = [
            f"{_iso_ts(record.created)} {record.levelname:<5}{role} {record.name}: "
            f"{record.getMessage()}"
        ]
        parts += [f"{k}={_text_value(v)}" for k, v in _extras(record).items()]
        exc = self._exc_text(record)
        if exc is not None:
            parts.append(f"exc={exc!r}")
        return _one_line(" ".join(parts))


def _text_value(value: object) -> str:
    text = str(value)
    return json.dumps(text) if (not text or any(c in text for c in ' "=')) else text


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


class _SLHandler(logging.StreamHandler[TextIO]):
    """Marks the handler we install, so a second call replaces it instead of adding one.
    Without a stream of its own it writes to ``sys.stderr`` as it is at each record: one
    bound at the call kept a replaced stderr, closed since (an embedding program's, a test's
    capture), and every later record was a 'Logging error' traceback on the new one."""

    def __init__(self, stream: TextIO | None) -> None:
        super().__init__(stream if stream is not None else sys.stderr)
        self.follows_stderr = stream is None

    def emit(self, record: logging.LogRecord) -> None:
        if self.follows_stderr:
            stream = sys.stderr
            # a worker's thread may log while its host swaps stderr: the process's own then
            if getattr(stream, "closed", False) and sys.__stderr__ is not None:
                stream = sys.__stderr__
            self.stream = stream
        super().emit(record)


def configure_logging(
    fmt: LogFormat | str,
    level: str = "INFO",
    role: str = "",
    *,
    stream: TextIO | None = None,
    quiet: tuple[str, ...] = (),
) -> None:
    """Send every log record to ``stream`` (default stderr) in ``fmt``, at ``level`` and up,
    except records below CRITICAL of the loggers named in ``quiet`` (and their children).

    Idempotent: calling it again replaces the handler installed by the previous call
    (handlers installed by others, such as pytest's, are left alone). ``quiet`` is this
    handler's filter, never a logger's level, so it goes with the handler.
    """
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter(role)
    elif fmt == "text":
        formatter = TextFormatter(role)
    else:
        raise ConfigError(f"unknown log format {fmt!r}", hint='use "text" or "json"')
    level_name = level.strip().upper()
    if level_name not in _LEVELS:
        raise ConfigError(f"unknown log level {level!r}", hint=f"use one of {', '.join(_LEVELS)}")
    handler = _SLHandler(stream)
    handler.setFormatter(formatter)
    if quiet:
        handler.addFilter(lambda record: not _named(record, quiet))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _SLHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level_name)
    logging.captureWarnings(True)


def _named(record: logging.LogRecord, quiet: tuple[str, ...]) -> bool:
    """``record`` is below CRITICAL and from a logger of ``quiet`` (or a child of one)."""
    if record.levelno >= logging.CRITICAL:
        return False
    return any(record.name == name or record.name.startswith(name + ".") for name in quiet)


def json_error_line(line: str) -> bool:
    """Write ``line`` (the command line's last word, why the process ends) as an ERROR record
    through the JSON handler :func:`configure_logging` installed, whatever the level: with
    JSON logs a collector reading stderr gets that line as JSON too. False where no JSON
    handler is installed (the caller prints the line as text)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _SLHandler) and isinstance(handler.formatter, JsonFormatter):
            handler.handle(
                logging.makeLogRecord(
                    {
                        "name": "sl_pipeline",
                        "msg": line,
                        "levelno": logging.ERROR,
                        "levelname": "ERROR",
                    }
                )
            )
            return True
    return False


__all__ = ["JsonFormatter", "LogFormat", "TextFormatter", "configure_logging", "json_error_line"]
